#!/usr/bin/env python
"""PyTorch reference for tools/bench.py: the same GPT (or LSTM), timed the same way.

    pip install torch numpy   # not an lmjax dependency
    python tools/bench_torch_reference.py [--layers 4 --heads 4 --width 128 --context 64 \
        --batch 12 --vocab 67 --steps 100]
    python tools/bench_torch_reference.py --model lstm --layers 2 --width 200 --context 20 \
        --batch 20 --vocab 10000      # PTB-small shape; char LSTM: --width 512 --context 64 \
                                      # --batch 32 --vocab 67

A plain eager PyTorch decoder with nanoGPT's shape and training recipe
(pre-norm blocks, causal scaled_dot_product_attention, exact GELU MLP, tied
embeddings, AdamW betas (0.9, 0.99) with weight decay on matrices, global-norm
clipping 1.0), on random tokens. Prints one JSON line with the median step time,
so lmjax's and PyTorch's numbers can be taken on the same machine, minutes apart.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional


class Block(nn.Module):
  def __init__(self, width, heads):
    super().__init__()
    self.heads = heads
    self.attention_norm = nn.LayerNorm(width, bias=False)
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.out = nn.Linear(width, width, bias=False)
    self.mlp_norm = nn.LayerNorm(width, bias=False)
    self.up = nn.Linear(width, 4 * width, bias=False)
    self.down = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    batch, length, width = x.shape
    q, k, v = self.qkv(self.attention_norm(x)).split(width, dim=2)
    shape = (batch, length, self.heads, width // self.heads)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.transpose(1, 2).contiguous().view(batch, length, width))
    return x + self.down(functional.gelu(self.up(self.mlp_norm(x))))


class Gpt(nn.Module):
  def __init__(self, vocab, context, width, heads, layers):
    super().__init__()
    self.embed = nn.Embedding(vocab, width)
    self.positions = nn.Embedding(context, width)
    self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
    self.final_norm = nn.LayerNorm(width, bias=False)
    for p in self.parameters():
      if p.dim() >= 2:
        nn.init.normal_(p, std=0.02)

  def forward(self, tokens, targets):
    x = self.embed(tokens) + self.positions(torch.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.final_norm(x) @ self.embed.weight.T
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Lstm(nn.Module):
  """Embedding -> nn.LSTM -> linear; the state carried between batches, detached."""

  def __init__(self, vocab, width, layers):
    super().__init__()
    self.embed = nn.Embedding(vocab, width)
    self.lstm = nn.LSTM(width, width, layers)
    self.out = nn.Linear(width, vocab)
    self.state = None

  def forward(self, tokens, targets):
    outputs, state = self.lstm(self.embed(tokens.T), self.state)  # time-major
    self.state = tuple(s.detach() for s in state)
    logits = self.out(outputs).transpose(0, 1)
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in (
    ('layers', 4),
    ('heads', 4),
    ('width', 128),
    ('context', 64),
    ('batch', 12),
    ('vocab', 67),
    ('steps', 100),
  ):
    parser.add_argument(f'--{name}', type=int, default=default)
  parser.add_argument('--model', choices=('gpt', 'lstm'), default='gpt')
  args = parser.parse_args()
  torch.manual_seed(0)
  if args.model == 'lstm':  # SGD + clipping 5 (Zaremba et al.)
    model = Lstm(args.vocab, args.width, args.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    clip = 5.0
  else:
    model = Gpt(args.vocab, args.context, args.width, args.heads, args.layers)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
      [{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
      lr=1e-3,
      betas=(0.9, 0.99),
    )
    clip = 1.0
  batches = [
    torch.randint(0, args.vocab, (args.batch, args.context + 1)) for _ in range(args.steps + 3)
  ]
  times = []
  for i, window in enumerate(batches):
    start = time.perf_counter()
    loss = model(window[:, :-1], window[:, 1:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    loss.item()  # Waits for the step, as tools/bench.py does.
    if i >= 3:
      times.append(time.perf_counter() - start)
  print(
    json.dumps(
      {
        'framework': f'torch {torch.__version__}',
        'model': args.model,
        'threads': torch.get_num_threads(),
        'params': sum(p.numel() for p in model.parameters()),
        'step_ms': 1e3 * statistics.median(times),
        'step_ms_mean': 1e3 * statistics.mean(times),
      }
    )
  )


if __name__ == '__main__':
  main()
