"""Text generation from a trained model, and the `lmjax.sample` command.

    python -m lmjax.sample --workdir DIR --prompt "def " [--step N]

The loops themselves (greedy, sampled, beam search) are lmjax.generation's.
"""

import os
import sys

import numpy as np
from absl import app
from absl import flags

from lmjax import checkpoint
from lmjax import cpu_host
from lmjax import evaluate
from lmjax import generation
from lmjax.data import cleaning

filter_logits = generation.filter_logits
generate = generation.generate
lower_stepwise = generation.lower_stepwise
decode_sample = generation.decode_sample


def encode_prompt(tokenizer, prompt: str, clean_config=None) -> np.ndarray:
  """The prompt's ids, cleaned as the training text was; an empty prompt starts
  a new document (the EOS token)."""
  if clean_config is not None:
    prompt = cleaning.clean(prompt, clean_config)
  unknown = getattr(tokenizer, 'unknown_chars', lambda text: [])(prompt)
  if unknown:
    raise ValueError(f'the prompt has characters outside the vocabulary: {unknown}')
  ids = tokenizer.encode(prompt) if prompt else np.zeros(0, np.int32)
  return np.concatenate([[tokenizer.eos_id], ids]).astype(np.int32)


def sample_text(
  params, model, tokenizer, sample_config, num_samples: int = 1, clean_config=None, prompts=None
) -> list[str]:
  """`num_samples` continuations of each prompt (default: sample_config.prompt), as text."""
  prompts = [sample_config.prompt] if prompts is None else list(prompts)
  encoded = [encode_prompt(tokenizer, prompt, clean_config) for prompt in prompts]
  generated = generate(
    params,
    model,
    encoded,
    sample_config.max_new_tokens,
    vocab_size=tokenizer.vocab_size,
    temperature=sample_config.temperature,
    top_k=sample_config.top_k,
    top_p=sample_config.top_p,
    seed=sample_config.seed,
    num_samples=num_samples,
    eos_id=tokenizer.eos_id,
  )
  return [
    prompts[i // num_samples] + decode_sample(tokenizer, row) for i, row in enumerate(generated)
  ]


def _main(argv):
  del argv
  checkpoint.quiet_logs()
  cpu_host.prepare()
  flag_values = flags.FLAGS
  try:
    restored = evaluate.restore_for_inference(
      flag_values.workdir, flag_values.step, log=lambda m: print(m, file=sys.stderr)
    )
  except checkpoint.ERRORS as error:
    sys.exit(f'error: {error}')
  config, tokenizer, model, params = (
    restored.config,
    restored.tokenizer,
    restored.model,
    restored.params,
  )
  if restored.task.generates_targets:
    _summarize(flag_values, restored)
    return
  if not restored.task.generates_text:
    sys.exit(
      f'error: {flag_values.workdir} trained task={config.task!r} '
      f'(model.family={config.model.family!r}); only a causal language model '
      "(task='lm') generates text"
    )
  sample_config = config.sample
  for name in ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed'):
    if flag_values[name].present:
      sample_config[name] = flag_values[name].value
  prompts = _prompts(flag_values)
  try:
    texts = sample_text(
      params,
      model,
      tokenizer,
      sample_config,
      flag_values.num_samples,
      config.data.clean,
      prompts or None,
    )
  except ValueError as error:
    sys.exit(str(error))
  for i, text in enumerate(texts):
    print(f'--- sample {i} (step {restored.step}) ---\n{text}')


def _prompts(flag_values) -> list[str]:
  prompts = list(flag_values.prompt or [])
  if flag_values.prompt_file:
    with open(flag_values.prompt_file, encoding='utf-8') as f:
      prompts += [line.rstrip('\n') for line in f if line.strip()]
  return prompts


def _summarize(flag_values, restored) -> None:
  """A run whose task generates targets (seq2seq): each prompt is a source, and
  the target generated for it is printed (the run's seq2seq decoding, or
  --beam_size / --length_penalty / --temperature)."""
  config = restored.config
  sources = [cleaning.clean(p, config.data.clean) for p in _prompts(flag_values)]
  if not sources:
    sys.exit('error: a seq2seq run generates a target per source: give --prompt or --prompt_file')
  for name in ('beam_size', 'length_penalty', 'temperature'):
    if flag_values[name].present:
      config.seq2seq[name] = flag_values[name].value
  try:
    targets = restored.task.generate_targets(
      config, restored.params, restored.model, restored.tokenizer, sources, 32
    )
  except ValueError as error:
    sys.exit(f'error: {error}')
  for i, (source, target) in enumerate(zip(sources, targets)):
    print(f'--- source {i} (step {restored.step}) ---\n{source}\n--- target ---\n{target}')


def run():
  flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.', required=True)
  flags.DEFINE_string('step', 'latest', "'latest' (newest intact), 'best', or a step number.")
  flags.DEFINE_multi_string(
    'prompt',
    None,
    "Text to continue (repeat for a batch of prompts; none = the run's sample.prompt).",
  )
  flags.DEFINE_string('prompt_file', '', 'A file of prompts, one per line.')
  flags.DEFINE_float(
    'top_p',
    1.0,
    'Nucleus sampling: keep the most likely tokens up to this probability mass (1 = all).',
  )
  flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature (0 = greedy).')
  flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens (0 = all).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('num_samples', 1, 'Samples to draw.')
  flags.DEFINE_integer('beam_size', 0, 'A seq2seq run: beam search of this many beams (0 = none).')
  flags.DEFINE_float('length_penalty', 0.0, "A seq2seq run's beam search: GNMT's alpha.")
  app.run(_main)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
