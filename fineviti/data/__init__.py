"""The data path: shards -> planner -> pixel path -> PackedBatch.

- shards.py: webdataset tar writer and reader, wds2idx-format index (random access by byte offset)
- synth.py: the deterministic synthetic dense-caption data set (`fineviti data synth`)
- tokenizer.py: caption tokenizer (a `tokenizers` JSON file; trained on the captions when a data set has none)
- sizes.py: the size rule (Qwen2-VL smart_resize) and its defaults
- dataset.py: a folder of shards as a table of samples (sizes from json or image headers; bad data counted)
- planner.py: seeded global order, windowed first-fit packing (C++ op plan_packs), dealing, resumable state
- pixels.py: PIL path, patch cutting in build_positions order, normalisation, PackedBatch assembly
- dali.py, nvjpeg.py: the DALI and torchvision (nvJPEG) pixel paths
- loader.py: DataConfig and PackedLoader (prefetch, consumed-batch state, exact resume)
- positions.py (build_positions) and batch.py (PackedBatch) are shared with the model.
"""
