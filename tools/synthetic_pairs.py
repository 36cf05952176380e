"""Writes a synthetic text-to-text corpus: JSONL files of {"source", "target"}
pairs where the source is a few sentences of random words and the target is
its second sentence (an extractive "summary" a model must find and copy).

    python tools/synthetic_pairs.py --out DIR [--train 4000 --valid 200 --seed 0]

Prints one JSON line: the files written and their pair counts. The lead-3
baseline scores well on it but not perfectly (it copies three sentences).
"""

import argparse
import json
import os
import random

WORDS = (
  'apple river stone cloud tiger lemon piano rocket garden silver window candle forest '
  'orange planet yellow dragon marble violet harbor meadow falcon copper winter summer '
  'bridge castle dancer engine hollow island jungle kettle ladder mirror needle'
).split()


def sentence(rng: random.Random) -> str:
  words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
  return ' '.join(words).capitalize() + '.'


def pair(rng: random.Random) -> dict:
  sentences = [sentence(rng) for _ in range(rng.randint(3, 4))]
  return {'source': ' '.join(sentences), 'target': sentences[1]}


def write(path: str, count: int, rng: random.Random) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for _ in range(count):
      f.write(json.dumps(pair(rng)) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--train', type=int, default=4000)
  parser.add_argument('--valid', type=int, default=200)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = random.Random(args.seed)
  files = {}
  for name, count in (('train', args.train), ('valid', args.valid)):
    path = os.path.join(args.out, f'{name}.jsonl')
    write(path, count, rng)
    files[path] = count
  print(json.dumps({'files': files}))


if __name__ == '__main__':
  main()
