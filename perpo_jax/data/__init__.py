"""Data for perpo_jax: TFDS builders (array_record, read without TensorFlow), readers of local
files, the tokenizer/processor that turns examples into token ids and pixels, and batching.
It reads and builds; it never runs a model (evaluation is `perpo_jax.eval`).

Modules (import the one you need; nothing is imported here so `perpo_jax.data` stays light):
- `shapes_scene`      synthetic shape scenes + unique referring expressions (numpy + PIL)
- `shapes_grounding`  TFDS builder `shapes_grounding` over shapes_scene; `build(data_dir, ...)`
- `shapes_ocr`        TFDS builder `shapes_ocr`: random text lines on noisy backgrounds
- `shapes_pope`       TFDS builder `shapes_pope`: POPE-style yes/no object questions
- `pope`              POPE question files (official JSONL) -> `Example`s
- `refcoco_style`     readers: official PerPO lists JSON, RefCOCO-style JSONL (+ errors by line)
- `refcoco_builders`  TFDS builders `refcoco_style` and `perpo_lists` over those readers, and
                      `CandidateLists`, the base of every pre-sampled-lists builder
- `pref_files`        finding and streaming parquet / Arrow / save_to_disk rows (pyarrow)
- `hf_preference`     preference pairs / scored lists from those rows + their TFDS builder
- `page_ocr`          page-OCR annotations (JSONL, Fox) and their TFDS builder
- `local_builder`     the builders' bases: `SceneBuilder` (shapes_*), `FileBuilder` (files)
- `prepare`           config -> the prepared dataset and processor (`prepare_data`)
- `examples`          records -> `Example`s, prompt widths and batches (train and eval share)
- `loader`            `ShardedLoader`: per-host shards, seeded shuffling, resumable state
- `tokenizer`         `train_tokenizer`: small byte-level BPE saved for AutoTokenizer
- `processor`         `LlavaPromptProcessor`: LLaVA-v1 prompt, <image> expansion, pixel values
- `batching`          right-padding to prompt [B, P] / response [B, K, R] arrays with masks
"""
