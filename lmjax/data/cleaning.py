"""Text cleaning from `config.data.clean`, applied identically to training text,
evaluation text and sampling prompts (so a model never sees text cleaned
differently from what it was trained on)."""

import re
import unicodedata

# data.documents: a record is one document, or is cut at blank lines or at lines.
DOCUMENT_UNITS = {'': None, 'paragraphs': '\n\n', 'lines': '\n'}

# C0 and C1 control characters, except tab, newline and carriage return.
_CONTROL = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]')


def clean(text: str, clean_config) -> str:
  if clean_config.nfkc:
    text = unicodedata.normalize('NFKC', text)
  if clean_config.lowercase:
    text = text.lower()
  if clean_config.strip_control:
    text = _CONTROL.sub('', text)
  if clean_config.drop_empty_lines:
    ends_with_newline = text.endswith('\n')
    text = '\n'.join(line for line in text.split('\n') if line.strip())
    if ends_with_newline and text:
      text += '\n'
  return text


def keep(text: str, clean_config) -> bool:
  """Whether a cleaned document is long enough to train or evaluate on."""
  return len(text.strip()) >= max(1, clean_config.min_doc_chars)
