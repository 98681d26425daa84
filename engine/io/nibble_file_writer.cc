// WriteNibbleFile: lays out every array at a 64-byte aligned offset of the
// data section, records offsets/lengths/CRC32Cs in the JSON directory, and
// writes header + JSON + data to path.tmp before renaming it over path.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <deque>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/io/mapped_file.h"
#include "engine/io/nibble_file.h"
#include "engine/io/nibble_file_internal.h"
#include "kernels/common/fp16.h"
#include "nlohmann/json.hpp"

namespace nibble::io {
namespace {

using nlohmann::json;

// The data section being laid out: (pointer, length) pairs at aligned offsets.
// Owned buffers (converted fp16, string lists) live in `owned_` (a deque, so
// their addresses are stable).
class DataLayout {
 public:
  // Places n bytes at the next aligned offset; `p` must stay valid until
  // written. Returns the JSON reference {offset, length, crc32c}.
  json Add(const void* p, uint64_t n) {
    const uint64_t off = nbl::AlignUp(end_);
    pieces_.push_back({static_cast<const uint8_t*>(p), n, off});
    end_ = off + n;
    return json{{"offset", off}, {"length", n}, {"crc32c", Crc32c(p, n)}};
  }
  json AddOwned(std::string bytes) {
    owned_.push_back(std::move(bytes));
    return Add(owned_.back().data(), owned_.back().size());
  }
  // A list of byte strings: count u32 lengths, then the concatenated bytes.
  json AddStrings(const std::vector<std::string>& v) {
    std::string buf(4 * v.size(), '\0');
    for (size_t i = 0; i < v.size(); ++i) {
      const auto len = static_cast<uint32_t>(v[i].size());
      std::memcpy(buf.data() + 4 * i, &len, 4);
    }
    for (const std::string& s : v) buf += s;
    json ref = AddOwned(std::move(buf));
    ref["count"] = v.size();
    return ref;
  }

  struct Piece {
    const uint8_t* data;
    uint64_t size;
    uint64_t offset;  // relative to the data section
  };
  const std::vector<Piece>& pieces() const { return pieces_; }
  uint64_t size() const { return end_; }

 private:
  std::vector<Piece> pieces_;
  std::deque<std::string> owned_;
  uint64_t end_ = 0;
};

json ConfigJson(const ModelConfig& c) {
  json j{{"architecture", c.architecture},
              {"dim", c.dim},
              {"hidden_dim", c.hidden_dim},
              {"n_layers", c.n_layers},
              {"n_heads", c.n_heads},
              {"n_kv_heads", c.n_kv_heads},
              {"head_dim", c.head_dim},
              {"vocab_size", c.vocab_size},
              {"max_seq_len", c.max_seq_len},
              {"norm_eps", c.norm_eps},
              {"rope_theta", c.rope_theta},
              {"rope_dim", c.rope_dim},
              {"rope_style", nbl::RopeStyleName(c.rope_style)},
              {"tied_embeddings", c.tied_embeddings}};
  if (c.residual_rotation != 0) j["residual_rotation"] = c.residual_rotation;
  if (c.ffn_rotation != 0) j["ffn_rotation"] = c.ffn_rotation;
  return j;
}

// Version 2 only when the model needs it (engine/io/nibble_file.h).
uint32_t VersionFor(const ModelConfig& c) { return c.residual_rotation != 0 || c.ffn_rotation != 0 ? 2 : 1; }

absl::StatusOr<json> TokenizerJson(const VocabSpec& v, const std::string& path, DataLayout* data) {
  json j{{"kind", nbl::TokenizerKindName(v.kind)},
         {"pre", v.pre},
         {"sp_model_path", v.sp_model_path},
         {"bos_id", v.bos_id},
         {"eos_id", v.eos_id},
         {"unk_id", v.unk_id},
         {"pad_id", v.pad_id},
         {"eog_ids", v.eog_ids},
         {"add_bos", v.add_bos},
         {"add_eos", v.add_eos},
         {"add_space_prefix", v.add_space_prefix},
         {"strip_space_after_bos", v.strip_space_after_bos},
         {"max_token_len", v.max_token_len}};
  if (!v.tokens.empty()) j["tokens"] = data->AddStrings(v.tokens);
  if (!v.scores.empty()) j["scores"] = data->Add(v.scores.data(), v.scores.size() * sizeof(float));
  if (!v.token_types.empty()) {
    static_assert(sizeof(TokenType) == 4);
    j["token_types"] = data->Add(v.token_types.data(), v.token_types.size() * sizeof(TokenType));
  }
  if (!v.merges.empty()) j["merges"] = data->AddStrings(v.merges);
  if (v.kind == TokenizerKind::kSentencePieceModel) {
    if (!v.sp_model_bytes.empty()) {
      j["sp_model"] = data->AddOwned(v.sp_model_bytes);
    } else {
      auto file = ReadFileToString(v.sp_model_path);
      if (!file.ok()) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": cannot embed the SentencePiece model: ", file.status().message()));
      }
      if (file->empty()) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": cannot embed the SentencePiece model: ", v.sp_model_path, " is empty"));
      }
      j["sp_model"] = data->AddOwned(*std::move(file));
    }
  }
  return j;
}

template <typename T>
json SpanRef(DataLayout* data, std::span<const T> s) {
  return data->Add(s.data(), s.size_bytes());
}

absl::StatusOr<json> TensorJson(const std::string& slot, const HostTensor& t, const std::string& path,
                                const NibbleWriteOptions& opts, DataLayout* data) {
  json j{{"name", slot}, {"shape", t.shape}};
  if (!t.name.empty() && t.name != slot) j["source_name"] = t.name;
  if (t.quant != nullptr) {
    const QuantTensor& q = *t.quant;
    if (t.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", slot, "' is quantized but not 2-D"));
    }
    if (auto s = nbl::ValidateQuant(q, t.rows(), t.cols(), slot, path); !s.ok()) return s;
    j["storage"] = "quant";
    json segs = json::array();
    for (const QuantSegment& s : q.segments) {
      segs.push_back(json{{"row_begin", s.row_begin},
                          {"row_end", s.row_end},
                          {"format", s.format.Name()},
                          {"data", SpanRef(data, s.data)}});
    }
    j["segments"] = std::move(segs);
    const Sidecar& sc = q.sidecar;
    if (sc.type != Sidecar::ValueType::kNone) {
      json side{{"type", nbl::SidecarTypeName(sc.type)},
                {"nnz", sc.nnz()},
                {"row_ptr", SpanRef(data, sc.row_ptr)},
                {"col", SpanRef(data, sc.col)}};
      if (sc.type == Sidecar::ValueType::kF16) {
        side["values"] = SpanRef(data, sc.f16);
      } else {
        side["values"] = SpanRef(data, sc.i8);
        side["row_scale"] = SpanRef(data, sc.row_scale);
      }
      j["sidecar"] = std::move(side);
    }
    return j;
  }
  if (t.is_f16()) {
    if (t.shape.size() != 2 || t.f16.size() != static_cast<size_t>(t.numel())) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", slot, "' has ", t.f16.size(), " fp16 values for its shape (", t.numel(), ")"));
    }
    j["storage"] = "f16";
    j["data"] = data->Add(t.f16.data(), t.f16.size_bytes());
    return j;
  }
  // bf16 matrices (kept for serving) are written widened: the file has no bf16 storage.
  std::vector<float> widened;
  if (t.is_bf16()) {
    widened.resize(t.bf16.size());
    for (size_t i = 0; i < widened.size(); ++i) widened[i] = Bf16ToFp32(t.bf16[i]);
  }
  const std::span<const float> values = t.is_bf16() ? std::span<const float>(widened)
                                                    : std::span<const float>(t.fp32(), t.fp32_size());
  if (values.size() != static_cast<size_t>(t.numel())) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor '", slot, "' has ", values.size(), " values for its shape (", t.numel(), ")"));
  }
  if ((opts.fp16_matrices && t.shape.size() == 2) || (opts.fp16_vectors && t.shape.size() == 1)) {
    std::string buf(values.size() * 2, '\0');
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t h = Fp32ToFp16(values[i]);
      if ((h & 0x7fff) == 0x7c00 && std::isfinite(values[i])) {  // a finite value rounded to +-inf
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", slot, "' value ", values[i], " at index ",
                                                       i, " is outside the fp16 range (|x| <= 65504); store it as "
                                                       "f32 (no fp16 matrices / --format f16)"));
      }
      std::memcpy(buf.data() + 2 * i, &h, 2);
    }
    j["storage"] = "f16";
    j["data"] = data->AddOwned(std::move(buf));
  } else {
    j["storage"] = "f32";
    j["data"] = data->Add(values.data(), values.size_bytes());
  }
  return j;
}

// Finds the first string (value or key) that is not valid UTF-8.
std::string FindBadUtf8(const json& j, const std::string& where) {
  if (j.is_string()) {
    const std::string p = nbl::Utf8Problem(j.get_ref<const std::string&>());
    return p.empty() ? "" : absl::StrCat(where, ": ", p);
  }
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string sub = absl::StrCat(where, where.empty() ? "" : ".", it.key());
      if (std::string p = nbl::Utf8Problem(it.key()); !p.empty()) return absl::StrCat(sub, " (key): ", p);
      if (std::string p = FindBadUtf8(it.value(), sub); !p.empty()) return p;
    }
  } else if (j.is_array()) {
    for (size_t i = 0; i < j.size(); ++i) {
      if (std::string p = FindBadUtf8(j[i], absl::StrCat(where, "[", i, "]")); !p.empty()) return p;
    }
  }
  return "";
}

// Sequential writer to a file descriptor; the first error sticks.
class FdWriter {
 public:
  FdWriter(int fd, const std::string& path) : fd_(fd), path_(path) {}
  void Write(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    while (n > 0 && status_.ok()) {
      const ssize_t w = ::write(fd_, b, std::min<size_t>(n, size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        status_ = absl::InternalError(absl::StrCat(path_, ": write failed: ", std::strerror(errno)));
        return;
      }
      b += w;
      n -= static_cast<size_t>(w);
      written_ += static_cast<uint64_t>(w);
    }
  }
  void PadTo(uint64_t offset) {
    static const char kZeros[kNibbleAlign] = {};
    while (written_ < offset && status_.ok()) Write(kZeros, std::min<uint64_t>(offset - written_, kNibbleAlign));
  }
  const absl::Status& status() const { return status_; }

 private:
  int fd_;
  const std::string& path_;
  absl::Status status_;
  uint64_t written_ = 0;
};

}  // namespace

absl::Status WriteNibbleFile(const LoadedModel& m, const std::string& path, const NibbleWriteOptions& opts) {
  if (auto s = m.config.Validate(path); !s.ok()) return s;
  if (auto s = m.weights.Validate(m.config, path); !s.ok()) return s;
  if (auto s = nbl::ValidateVocab(m.vocab, m.config.vocab_size, path); !s.ok()) return s;

  DataLayout data;
  json doc;
  doc["format"] = "nibble";
  doc["version"] = VersionFor(m.config);
  doc["config"] = ConfigJson(m.config);
  auto tok = TokenizerJson(m.vocab, path, &data);
  if (!tok.ok()) return tok.status();
  doc["tokenizer"] = *std::move(tok);
  doc["chat_template"] = m.chat_template;
  doc["metadata"] = json::object();
  for (const auto& [k, v] : m.metadata) doc["metadata"][k] = v;
  doc["origin"] = json{{"source_format", m.source_format}, {"source_path", m.source_path}};
  json tensors = json::array();
  absl::Status status;
  nbl::ForEachSlot(m.weights, [&](const std::string& slot, const HostTensor& t) {
    if (!status.ok() || t.empty()) return;
    auto tj = TensorJson(slot, t, path, opts, &data);
    if (!tj.ok()) {
      status = tj.status();
      return;
    }
    tensors.push_back(*std::move(tj));
  });
  if (!status.ok()) return status;
  doc["tensors"] = std::move(tensors);
  if (std::string bad = FindBadUtf8(doc, ""); !bad.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot store a string that is not UTF-8 in the JSON directory: ", bad));
  }
  const std::string text = doc.dump(-1, ' ', false, json::error_handler_t::replace);

  nbl::Header h;
  h.version = VersionFor(m.config);
  h.json_offset = kNibbleHeaderSize;
  h.json_length = text.size();
  h.data_offset = nbl::AlignUp(h.json_offset + h.json_length);
  h.data_length = data.size();
  h.json_crc32c = Crc32c(text.data(), text.size());
  const std::string header = nbl::EncodeHeader(h);

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot create: ", std::strerror(errno)));
  FdWriter w(fd, tmp);
  w.Write(header.data(), header.size());
  w.Write(text.data(), text.size());
  for (const DataLayout::Piece& p : data.pieces()) {
    w.PadTo(h.data_offset + p.offset);
    w.Write(p.data, p.size);
  }
  w.PadTo(h.data_offset + h.data_length);
  absl::Status result = w.status();
  if (result.ok() && opts.fsync && ::fsync(fd) != 0) {
    result = absl::InternalError(absl::StrCat(tmp, ": fsync failed: ", std::strerror(errno)));
  }
  if (::close(fd) != 0 && result.ok()) {
    result = absl::InternalError(absl::StrCat(tmp, ": close failed: ", std::strerror(errno)));
  }
  if (result.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    result = absl::InternalError(absl::StrCat(path, ": cannot rename ", tmp, " over it: ", std::strerror(errno)));
  }
  if (!result.ok()) ::unlink(tmp.c_str());
  return result;
}

}  // namespace nibble::io
