"""Stage 5, validation: running a (quantized) file on kquant's own kernels as llama.cpp's
tools do.

- `perplexity`: llama-perplexity's default and strided modes (`run_perplexity`);
- `kld`: its KL-divergence mode against a base model's logits (`run_kl_divergence`);
- `logits_file`: the base-logits file format both tools read and write;
- `sampling`: llama.cpp's sampler chain, to the token (`Sampler`);
- `generate`: the token-by-token loop over the KV cache (`Decoder`, `generate`);
- `chat`: chat templates rendered as llama.cpp renders them (`ChatTemplate`);
- `conversation`: a chat turn by turn, as llama-completion's -cnv (`Conversation`);
- `common`: the settings, batch layout and model loading they share.
The chunk and batch loop under them is kquant.runtime.chunks, shared with calibration.
"""
