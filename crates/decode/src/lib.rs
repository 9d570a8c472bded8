//! Beam search and greedy decoding for PALM over the model's KV cache.
//!
//! `palm-decode` will own the reference beam search of `palm-reference.md` §5 (GNMT length
//! penalty, minimum and maximum length, an item finishes when its top beam ends, EOS beams
//! recorded but not pruned), batched over sources, with cross-attention keys and values
//! computed once per source and shared by its beams. It works on token ids; it must not depend
//! on tokenizers or arrow. The search lands with the model issue; this crate holds its
//! dependencies until then.
