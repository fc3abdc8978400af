"""Tiny random Hugging Face causal LMs for the stage-2 tests (needs transformers, the `hf` extra)."""

import json

import torch


def make_hf_lm(folder, tokenizer_json, kind="llama", seed=0, dtype=torch.float32):
    """A random `kind` causal LM of two layers over the vocabulary of tokenizer_json, saved with its tokenizer in
    `folder` as a downloaded model would be (config.json, model.safetensors, tokenizer.json and the special
    tokens' names in tokenizer_config.json), its weights in `dtype` (pretrained LMs ship bf16)."""
    import shutil

    import transformers
    from tokenizers import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
             "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(names))
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    if kind == "llama":  # an output head of its own
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=False))
    elif kind == "qwen2":  # the head tied to the input embeddings
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    elif kind == "gemma2":  # logits soft-capped, and a key/value cache its layers fill unless told not to
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape, head_dim=8))
    else:
        raise ValueError(kind)
    model.to(dtype).save_pretrained(folder)
    return folder
