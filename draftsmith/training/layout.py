"""The layout of a tokenized dataset folder (the `dataset` stage's output), importable without Ray: the quantize
stage and the GPU check read it on machines that have no Ray."""

TRAIN_DIR = "train"  # parquet files of rows {input_ids, target_mask, num_tokens, ...}
VALIDATION_DIR = "validation"
