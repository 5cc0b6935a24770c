"""Criteo text (Kaggle train.txt, Terabyte day_N, plain or .gz) -> the parquet layout the loader reads.

    python -m dlrm.data.preprocess data/raw/train.txt --out data/criteo-kaggle
    python -m dlrm.data.preprocess data/raw/day_{0..23}.gz --out data/criteo-1tb --min-count 15
    python -m dlrm.data.preprocess data/raw/day_*.gz --out data/criteo-1tb-h40m --mode hash --max-rows 40000000

Bounded memory, restartable, parallel:
  * Input files are cut into chunks of --chunk-mb of text (see criteo_text); every chunk is one unit
    of work: parsed, processed, written under a temporary name and renamed, then recorded in the
    manifest (.work/<pass>/<file>/<chunk>.json). A rerun skips recorded chunks, so a crash costs at
    most the chunks in flight; an output without a record is redone.
  * vocab mode (default): pass 1 parses each chunk, counts every categorical value and stages the
    parsed rows (zstd Arrow IPC; --no-staging parses the text again instead); the per-chunk counts
    are merged one column at a time into a vocabulary ordered by frequency (id 0 = missing or
    rarer than --min-count, id 1 = most frequent); pass 2 encodes. Memory grows with the
    vocabulary and --chunk-mb x --workers, never with the number of rows.
  * hash mode: one pass; id = 1 + mix64(value) mod (max_rows - 1), id 0 = missing.
  * Last, the chunk outputs are assigned to train/val/test by row position (a chunk straddling a
    boundary is sliced) and meta.json is written: its presence means the dataset is complete.

Categorical values that are exactly 8 bytes long (all of Criteo's 8-hex-digit values) are keyed by
those 8 bytes packed into a uint64 (exact, no hashing); any other string is kept as a string.

Modules, in the order a run uses them: settings (what determines the output, work layout), cli,
checks (refusals before work and after the first pass), run (the whole run), passes (a pass over
all inputs), workers (processes), chunks (one chunk), keys (value -> uint64), count (per-chunk
counts), vocab (merged vocabulary and counts), encode (value -> id), splits (train/val/test),
summary, files (atomic writers).
"""

from dlrm.data.preprocess.cli import main, parse_args
from dlrm.data.preprocess.encode import HashEncoder, VocabEncoder
from dlrm.data.preprocess.keys import column_keys, mix64, string_hash64
from dlrm.data.preprocess.run import preprocess
from dlrm.data.preprocess.settings import PreprocessError, Settings
from dlrm.data.preprocess.splits import plan_splits
from dlrm.data.preprocess.summary import format_summary
from dlrm.data.preprocess.vocab import load_counts

__all__ = [
    "HashEncoder", "PreprocessError", "Settings", "VocabEncoder", "column_keys", "format_summary", "load_counts",
    "main", "mix64", "parse_args", "plan_splits", "preprocess", "string_hash64",
]  # fmt: skip
