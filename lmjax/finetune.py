"""Fine-tuning from a pre-training checkpoint (`config.init_from`).

The pre-trained parameters are restored (Orbax, parameters only) into the new
model: as the whole model (causal LM fine-tuning on a new corpus) or as the
'backbone' of a classifier, whose 'head' is new. `finetune.mode`:

  full    every parameter trains.
  frozen  only the new parameters (the head) train: the optimizer is an optax
          `multi_transform` whose 'frozen' part sets updates to zero.
  lora    Low-Rank Adaptation (Hu et al. 2021): each pre-trained matrix W whose
          path matches `finetune.lora_targets` is used as W + (alpha / r) A B,
          A [in, r] (Gaussian) and B [r, out] (zeros, so training starts at
          the pre-trained model). Only A, B and the new parameters are trained
          and checkpointed (`TrainState.params`); the pre-trained weights are
          `TrainState.frozen`, read again from `init_from` on every start and
          never written to the run's checkpoints.

LoRA here merges the adapters into the weights inside the step (one small
matmul per target) and runs the model unchanged, so it works for every family
without touching model code; the price is that the backward pass forms each
target's full weight gradient before projecting it onto A and B (as much
compute as full fine-tuning, with none of its optimizer memory).

A kernel of any rank is adapted as a matrix: its 'embed' axis on one side,
every other axis flattened on the other (qkv [embed, 3, heads, kv] ->
[embed, 3 * heads * kv]; out [heads, kv, embed] -> [heads * kv, embed]).
"""

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmjax import checkpoint
from lmjax import train_state
from lmjax.data import tokenizers

MODES = ('full', 'frozen', 'lora')


def parse_init_from(spec: str) -> tuple[str, str]:
  """'WORKDIR' or 'WORKDIR:STEP' (STEP: latest, best or a number) -> (workdir, step)."""
  workdir, _, step = spec.rpartition(':')
  if workdir and (step in ('latest', 'best') or step.isdigit()):
    return workdir, step
  return spec, 'latest'


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def flatten(tree, is_leaf=None) -> dict:
  """{'a/b/c': leaf} of a nested dict of parameters."""
  return {
    _path_name(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  }


def _flatten_specs(specs) -> dict:
  return flatten(specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def _unflatten(flat: dict) -> dict:
  tree = {}
  for name, leaf in flat.items():
    node = tree
    *parents, last = name.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def subtree(tree, prefix: tuple):
  for key in prefix:
    tree = tree[key]
  return tree


def with_subtree(tree, prefix: tuple, value):
  """A copy of nested dict `tree` with the node at `prefix` replaced by `value`."""
  if not prefix:
    return value
  return {**tree, prefix[0]: with_subtree(tree[prefix[0]], prefix[1:], value)}


def nest(prefix: tuple, value) -> dict:
  """`value` at `prefix` of an otherwise empty nested dict."""
  for key in reversed(prefix):
    value = {key: value}
  return value


def backbone_prefix(model) -> tuple:
  """Where the pre-trained parameters go in `model`'s tree: a classifier's
  'backbone', or the root of a language model."""
  return ('backbone',) if hasattr(model, 'num_classes') else ()


def _split_axis(names) -> int:
  """How a kernel is seen as a matrix: axes before the split are its input."""
  return len(names) - 1 if names and names[-1] == 'embed' else 1


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a run fine-tunes: its mode, where the pre-trained tree sits in the model
  (`prefix`), the names of its leaves (`pretrained`, relative to the model's
  root) and, for LoRA, each target matrix as (name, rows, columns, layers): a
  scanned block's kernel has one adapter pair per layer (layers > 0), A
  [layers, rows, r] and B [layers, r, columns]."""

  mode: str
  prefix: tuple
  pretrained: frozenset
  lora_rank: int = 8
  lora_alpha: float = 16.0
  matrices: tuple = ()

  @classmethod
  def for_model(cls, finetune_config, prefix: tuple, pretrained_names, params, specs) -> 'Plan':
    """The plan for abstract model `params` with logical `specs`; checks that a
    frozen or LoRA run has something to train."""
    mode = finetune_config.mode
    if mode not in MODES:
      raise ValueError(f'finetune.mode must be one of {", ".join(MODES)}; got {mode!r}')
    pretrained = frozenset(pretrained_names)
    flat, flat_specs = flatten(params), _flatten_specs(specs)
    if mode == 'frozen' and all(name in pretrained for name in flat):
      raise ValueError(
        "finetune.mode='frozen' trains only new parameters (a classifier's "
        "head), and this model has none: use 'full' or 'lora'"
      )
    matrices = ()
    if mode == 'lora':
      if finetune_config.lora_rank < 1:
        raise ValueError(f'finetune.lora_rank must be >= 1; got {finetune_config.lora_rank}')
      pattern = re.compile(finetune_config.lora_targets)
      for name, leaf in sorted(flat.items()):
        names = tuple(flat_specs[name] or ())
        layers = leaf.shape[0] if names[:1] == ('layers',) else 0  # scanned blocks
        shape, names = (leaf.shape[1:], names[1:]) if layers else (leaf.shape, names)
        if name in pretrained and len(shape) >= 2 and pattern.search(name):
          split = _split_axis(names)
          rows, columns = math.prod(shape[:split]), math.prod(shape[split:])
          matrices += ((name, rows, columns, layers),)
      if not matrices:
        raise ValueError(
          f'finetune.lora_targets={finetune_config.lora_targets!r} matches no '
          f'pre-trained matrix; parameter names look like: '
          f'{", ".join(sorted(flat)[:6])}'
        )
    return cls(
      mode, prefix, pretrained, finetune_config.lora_rank, finetune_config.lora_alpha, matrices
    )

  @property
  def scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def is_pretrained(self, name: str) -> bool:
    return name in self.pretrained

  def _new_and_pretrained(self, flat: dict) -> tuple[dict, dict]:
    """A flat tree's new leaves and its pre-trained ones, as nested trees."""
    new = {n: leaf for n, leaf in flat.items() if not self.is_pretrained(n)}
    pretrained = {n: leaf for n, leaf in flat.items() if self.is_pretrained(n)}
    return _unflatten(new), _unflatten(pretrained)

  # -- optimizer (mode 'frozen') ---------------------------------------------------

  def wrap_optimizer(self, tx):
    """'frozen': `tx` on the new parameters, zero updates (and no state) on the rest."""
    import optax

    if self.mode != 'frozen':
      return tx
    labels = lambda params: _unflatten(
      {name: 'frozen' if self.is_pretrained(name) else 'train' for name in flatten(params)}
    )
    return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)

  # -- the trainable / frozen split (mode 'lora') ----------------------------------

  def split_abstract(self, params, specs):
    """(trainable, trainable specs, frozen, frozen specs) for abstract `params`.
    LoRA: trainable = {'lora': adapters, 'new': new parameters} and frozen = the
    pre-trained ones. Other modes: everything is trainable, nothing frozen."""
    if self.mode != 'lora':
      return params, specs, None, None
    flat, flat_specs = flatten(params), _flatten_specs(specs)
    adapters, adapter_specs = {}, {}
    for name, rows, columns, layers in self.matrices:
      dtype, stacked = flat[name].dtype, (layers,) if layers else ()
      adapters[name + '/a'] = jax.ShapeDtypeStruct((*stacked, rows, self.lora_rank), dtype)
      adapters[name + '/b'] = jax.ShapeDtypeStruct((*stacked, self.lora_rank, columns), dtype)
      adapter_specs[name + '/a'] = adapter_specs[name + '/b'] = PartitionSpec()
    new, frozen = self._new_and_pretrained(flat)
    new_specs, frozen_specs = self._new_and_pretrained(flat_specs)
    return (
      {'lora': _unflatten(adapters), 'new': new},
      {'lora': _unflatten(adapter_specs), 'new': new_specs},
      frozen,
      frozen_specs,
    )

  def place_pretrained(self, params, pretrained):
    """`params` with the pre-trained tree at the plan's prefix."""
    return with_subtree(params, self.prefix, pretrained)

  def split_values(self, params, rng):
    """(trainable, frozen) values from a full parameter tree. LoRA's A is drawn
    from `rng` with std 1/sqrt(rows), B is zero."""
    if self.mode != 'lora':
      return params, None
    flat = flatten(params)
    adapters = {}
    for i, (name, rows, columns, layers) in enumerate(self.matrices):
      dtype, stacked = flat[name].dtype, (layers,) if layers else ()
      adapters[name + '/a'] = jax.random.normal(
        jax.random.fold_in(rng, i), (*stacked, rows, self.lora_rank), dtype
      ) * jnp.asarray(rows**-0.5, dtype)
      adapters[name + '/b'] = jnp.zeros((*stacked, self.lora_rank, columns), dtype)
    new, frozen = self._new_and_pretrained(flat)
    return {'lora': _unflatten(adapters), 'new': new}, frozen

  def assemble(self, trainable, frozen):
    """The model's parameters: frozen + (alpha / r) A B on every target, plus the
    new parameters. Identity when nothing is frozen."""
    if frozen is None:
      return trainable
    flat = flatten(frozen)
    adapters = flatten(trainable['lora'])
    for name, *_ in self.matrices:
      kernel = flat[name]
      delta = adapters[name + '/a'] @ adapters[name + '/b']  # a layer's each, when stacked
      flat[name] = kernel + (self.scale * delta).reshape(kernel.shape).astype(kernel.dtype)
    flat.update(flatten(trainable['new']))
    return _unflatten(flat)


def plan_for(config, model) -> Plan | None:
  """The run's fine-tuning plan (None without init_from)."""
  if not config.init_from:
    return None
  params, specs = train_state.params_and_specs(model, config.data.seq_len)
  prefix = backbone_prefix(model)
  return Plan.for_model(config.finetune, prefix, pretrained_names(params, prefix), params, specs)


def optimizer_and_plan(config, model, derived):
  """(optimizer, schedule, plan) of the run: the configured optimizer over the
  derived record's length (lmjax.derived), wrapped by the fine-tuning plan when
  there is one (None otherwise)."""
  plan = plan_for(config, model)
  tx, schedule = train_state.make_optimizer(
    config.optimizer, derived.num_steps, derived.steps_per_epoch
  )
  if plan is not None:
    tx = plan.wrap_optimizer(tx)
  return tx, schedule, plan


# ----------------------------------------------------------------------------
# Reading the pre-training run.


@dataclasses.dataclass
class Pretrained:
  """The checkpoint `init_from` names: its step, config and tokenizer."""

  workdir: str
  step: int
  config: Any
  tokenizer: Any
  checkpoints: Any

  def describe(self) -> str:
    return f'{self.workdir} step {self.step}'


def open_pretrained(init_from: str, log=print) -> Pretrained:
  """The checkpoint of `init_from` (the newest intact one for 'latest'), with the
  config and tokenizer it was trained with."""
  workdir, step = parse_init_from(init_from)
  checkpoints, chosen, (config, _, tokenizer) = checkpoint.newest_intact(
    workdir, step, checkpoint.read_run, log, what='init_from: '
  )
  return Pretrained(workdir, chosen, config, tokenizer, checkpoints)


def check_tokenizer_config(pretrained: Pretrained, tokenizer_config) -> None:
  """The run fine-tunes with the pre-trained tokenizer: a config asking for
  another kind, or another sentencepiece model, is an error."""
  saved = pretrained.tokenizer
  if tokenizer_config.kind != saved.kind:
    raise tokenizers.TokenizerError(
      f'init_from {pretrained.describe()} was trained with a {saved.kind!r} tokenizer '
      f'({saved.fingerprint()}), but this config asks for tokenizer.kind='
      f'{tokenizer_config.kind!r}; fine-tuning uses the pre-trained tokenizer: set '
      f'--config.tokenizer.kind={saved.kind}'
    )
  if saved.kind == 'sentencepiece' and tokenizer_config.model_file:
    given = tokenizers.SentencePieceTokenizer.load(tokenizer_config.model_file)
    if given.fingerprint() != saved.fingerprint():
      raise tokenizers.TokenizerError(
        f'tokenizer.model_file={tokenizer_config.model_file!r} ({given.fingerprint()}) is not '
        f'the tokenizer of init_from {pretrained.describe()} ({saved.fingerprint()})'
      )


def restore_backbone(pretrained: Pretrained, abstract_backbone):
  """The pre-trained parameters, into the shapes and shardings of
  `abstract_backbone` (the model's tree at its prefix); parameters the
  checkpoint has beyond them (an LM's output layer) are not read. A shape that
  differs raises CheckpointError naming every difference."""
  try:
    return checkpoint.restore_params(
      pretrained.checkpoints, pretrained.step, abstract_backbone, allow_unused=True
    )
  except checkpoint.CheckpointError as error:
    raise checkpoint.CheckpointError(
      f'init_from {pretrained.describe()}: {error}\nThe fine-tuning config must build the '
      'pre-trained model: the same model.* settings, and data.seq_len too with learned '
      'positions.'
    ) from error


def pretrained_names(abstract_params, prefix: tuple) -> list[str]:
  """Every leaf under `prefix`, named from the model's root."""
  head = '/'.join(prefix)
  return [f'{head}/{name}' if head else name for name in flatten(subtree(abstract_params, prefix))]
