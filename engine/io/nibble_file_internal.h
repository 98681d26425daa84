// Internals shared by the nibble model file writer and reader
// (nibble_file_writer.cc, nibble_file_reader.cc). Not a public API.
//
// Goals: one definition of the binary header, the tensor slot names, the
// stable enum spellings, and the consistency rules both sides enforce (a
// writer must never produce a file its reader rejects).
// Non-goals: I/O (the .cc files do it).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/core/config.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "engine/tokenizer/vocab.h"

namespace nibble::io::nbl {

// Debian's abseil has its own string_view type: convert explicitly.
inline absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// The fixed 64-byte header (docs/FORMAT.md, "Header"). All fields little-endian.
struct Header {
  uint32_t version = 0;
  uint64_t json_offset = 0;  // absolute
  uint64_t json_length = 0;
  uint64_t data_offset = 0;  // absolute, multiple of kNibbleAlign
  uint64_t data_length = 0;  // file size == data_offset + data_length
  uint32_t json_crc32c = 0;
  uint32_t flags = 0;  // must be 0 in version 1
};

// Byte offsets of the header fields.
inline constexpr size_t kOffVersion = 4, kOffJsonOffset = 8, kOffJsonLength = 16, kOffDataOffset = 24,
                        kOffDataLength = 32, kOffJsonCrc = 40, kOffFlags = 44, kOffReserved = 48, kOffHeaderCrc = 60;

// The 64 header bytes, header CRC included.
std::string EncodeHeader(const Header& h);

// x rounded up to a multiple of kNibbleAlign. REQUIRES: no overflow (x < 2^63).
inline uint64_t AlignUp(uint64_t x) { return (x + 63) & ~uint64_t{63}; }

// Calls f(slot_name, tensor) for every tensor slot of `w`, in file order:
// tok_embeddings, layers.<i>.{attn_norm,wq,wk,wv,wo,ffn_norm,w_gate,w_up,w_down},
// final_norm, output. W is ModelWeights or const ModelWeights.
template <typename W, typename F>
void ForEachSlot(W& w, F&& f) {
  f(std::string("tok_embeddings"), w.tok_embeddings);
  for (size_t i = 0; i < w.layers.size(); ++i) {
    auto& l = w.layers[i];
    const std::string p = absl::StrCat("layers.", i, ".");
    f(p + "attn_norm", l.attn_norm);
    f(p + "wq", l.wq);
    f(p + "wk", l.wk);
    f(p + "wv", l.wv);
    f(p + "wo", l.wo);
    f(p + "ffn_norm", l.ffn_norm);
    f(p + "w_gate", l.w_gate);
    f(p + "w_up", l.w_up);
    f(p + "w_down", l.w_down);
  }
  f(std::string("final_norm"), w.final_norm);
  f(std::string("output"), w.output);
}

// Stable spellings stored in the JSON (never renamed).
const char* RopeStyleName(RopeStyle s);
std::optional<RopeStyle> ParseRopeStyle(std::string_view s);
const char* TokenizerKindName(TokenizerKind k);
std::optional<TokenizerKind> ParseTokenizerKind(std::string_view s);
const char* SidecarTypeName(Sidecar::ValueType t);
std::optional<Sidecar::ValueType> ParseSidecarType(std::string_view s);

// Vocabulary invariants (sizes agree with vocab_size, ids in range, token
// types known). Errors name `path`.
absl::Status ValidateVocab(const VocabSpec& v, int vocab_size, const std::string& path);

// Quantized tensor invariants for a [rows, cols] matrix named `name`:
// segments cover [0, rows) in order without gaps, every format is valid and
// round-trips through its Name(), every segment holds exactly
// rows * RowBytes(cols) bytes, and the side-car arrays have consistent sizes
// and contents (row_ptr[0] == 0, non-decreasing, row_ptr[rows] == nnz,
// col < cols). Reads the side-car arrays. Errors name `path` and `name`.
absl::Status ValidateQuant(const QuantTensor& q, int64_t rows, int64_t cols, const std::string& name,
                           const std::string& path);

// Empty if every byte sequence in `s` is valid UTF-8 (no overlongs, no
// surrogates, <= U+10FFFF); else a description of the first bad byte.
std::string Utf8Problem(std::string_view s);

}  // namespace nibble::io::nbl
