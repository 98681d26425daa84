// Everything a tokenizer needs, as read from a model file (GGUF metadata,
// llama2.c tok*.bin, a SentencePiece .model path). Readers fill it;
// CreateTokenizer() (tokenizer.h) turns it into a Tokenizer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nibble {

enum class TokenizerKind {
  kNone,
  // Score-ordered BPE over a piece list with <0xXX> byte fallback:
  // llama2.c tok*.bin and GGUF tokenizer.ggml.model == "llama".
  kSpmScores,
  // GPT-2 style byte-level BPE with ranked merges and a pre-tokenizer regex:
  // GGUF tokenizer.ggml.model == "gpt2" (SmolLM2, Llama 3, Qwen...).
  kGpt2Bpe,
  // A SentencePiece .model file (native implementation: sp_processor.h).
  kSentencePieceModel,
};

// GGUF token types (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

struct VocabSpec {
  TokenizerKind kind = TokenizerKind::kNone;
  std::vector<std::string> tokens;        // piece text (GPT-2 kind: byte-level encoded, e.g. "Ġthe")
  std::vector<float> scores;              // kSpmScores: merge priority (higher merges first)
  std::vector<TokenType> token_types;     // may be empty (all normal)
  std::vector<std::string> merges;        // kGpt2Bpe: "a b" ranked, first = highest priority
  std::string pre;                        // kGpt2Bpe pre-tokenizer name (GGUF tokenizer.ggml.pre)
  std::string sp_model_path;              // kSentencePieceModel: the .model file, or
  std::string sp_model_bytes;             // ... its serialized bytes (embedded in nibble files)
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  std::vector<int32_t> eog_ids;           // end-of-generation tokens besides eos (e.g. <|im_end|>)
  bool add_bos = true;
  bool add_eos = false;
  bool add_space_prefix = true;           // SPM: prepend " " to the text before encoding
  // llama2.c: when decoding, the first piece after BOS loses its leading space.
  bool strip_space_after_bos = true;
  int max_token_len = 0;                  // llama2.c header field; informational
};

}  // namespace nibble
