"""Stage 1 and 4, the file formats apart from the math: reading models (GGUF files and split
files, safetensors shards, Hugging Face folders as convert_hf_to_gguf.py sees them), writing
GGUF, text inputs, and the atomic writer every output goes through.

- `source`: a model as GGUF metadata plus lazily loaded tensors (`ModelSource`), what every
  reader returns and the GGUF writer takes;
- `gguf_read`, `gguf_write`: GGUF files (split files too), streamed tensor by tensor;
- `safetensors`, `hf_vocab`, `hf`: a Hugging Face folder's shards, its tokenizer, and the folder
  as the GGUF convert_hf_to_gguf.py would write (per-architecture rules in kquant.archs);
- `text`: calibration and evaluation text as llama.cpp's -f reads it;
- `atomic`: temporary file, fsync, rename; the one "output is an input" check.
"""
