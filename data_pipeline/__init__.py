"""Data pipeline: image-text sources → WebDataset shards on any fsspec URL → resumable training loader.

Never imports ``soho``, ``orchestration``, ``ray`` or ``deepspeed`` (see docs/DESIGN.md).

Entry points:
    python -m data_pipeline shard ...            sources → shards (+ manifest.json, bad_samples.jsonl)
    python -m data_pipeline synth ...            synthetic scenes + downstream ground truth
    python -m data_pipeline merge-manifests ...  join the per-job parts of a parallel shard job

Modules: ``storage`` (fsspec helpers, atomic commit), ``writer`` (shard tars, manifest), ``images``
(decode/repair/resize/encode), ``sources`` (CSV/TSV/Parquet/JSONL/COCO/folder/WebDataset readers),
``shard`` (the parallel, resumable shard job), ``synth`` (synthetic scenes), ``tarstream`` (safe tar
reading), ``loader`` (the training stream), ``tokenizer`` (offline BERT WordPiece tokenizer).
"""
