// LoadNibbleFile: maps the file, checks the header and JSON checksums,
// validates every reference into the data section, then copies fp32/fp16
// tensors and wraps quantized ones as views into the mapping.
#include <cstring>
#include <limits>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/io/mapped_file.h"
#include "engine/io/nibble_file.h"
#include "engine/io/nibble_file_internal.h"
#include "engine/io/parallel.h"
#include "kernels/common/fp16.h"
#include "nlohmann/json.hpp"

namespace nibble::io {
namespace {

using nbl::Av;
using nlohmann::json;

// A validated [offset, offset + length) range of the data section.
struct Ref {
  const uint8_t* data = nullptr;
  uint64_t length = 0;
  uint32_t crc32c = 0;
  bool present = false;
};

// Bounds- and type-checked access to the JSON directory; every error names
// the file and the field path.
class Reader {
 public:
  Reader(const MappedFile& file, const nbl::Header& h) : file_(file), h_(h) {}

  const std::string& path() const { return file_.path(); }

  absl::Status Bad(std::string_view where, std::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(path(), ": ", Av(where), ": ", Av(what)));
  }

  // Returns the member `key` of object `obj`, or nullptr (error if required).
  absl::StatusOr<const json*> Field(const json& obj, std::string_view key, std::string_view where,
                                    bool required = true) const {
    if (!obj.is_object()) return Bad(where, "expected a JSON object");
    auto it = obj.find(std::string(key));
    if (it == obj.end()) {
      if (required) return Bad(where, absl::StrCat("missing field '", Av(key), "'"));
      return nullptr;
    }
    return &*it;
  }

  absl::Status Int(const json& obj, std::string_view key, std::string_view where, int64_t lo, int64_t hi, int64_t* out,
                   bool required = true) const {
    auto f = Field(obj, key, where, required);
    if (!f.ok()) return f.status();
    if (*f == nullptr) return absl::OkStatus();
    const json& v = **f;
    bool ok = false;
    int64_t x = 0;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      ok = u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      x = static_cast<int64_t>(u);
    } else if (v.is_number_integer()) {
      ok = true;
      x = v.get<int64_t>();
    }
    if (!ok || x < lo || x > hi) {
      return Bad(where, absl::StrCat("field '", Av(key), "' must be an integer in [", lo, ", ", hi, "], got ",
                                     v.dump().substr(0, 40)));
    }
    *out = x;
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status Int(const json& obj, std::string_view key, std::string_view where, T* out, bool required = true) const {
    int64_t x = *out;
    const int64_t lo = std::numeric_limits<T>::min(), hi = std::numeric_limits<T>::max();
    if (auto s = Int(obj, key, where, lo, hi, &x, required); !s.ok()) return s;
    *out = static_cast<T>(x);
    return absl::OkStatus();
  }

  absl::Status Float(const json& obj, std::string_view key, std::string_view where, float* out) const {
    auto f = Field(obj, key, where);
    if (!f.ok()) return f.status();
    if (!(*f)->is_number()) return Bad(where, absl::StrCat("field '", Av(key), "' must be a number"));
    *out = static_cast<float>((*f)->get<double>());
    return absl::OkStatus();
  }

  absl::Status Bool(const json& obj, std::string_view key, std::string_view where, bool* out) const {
    auto f = Field(obj, key, where);
    if (!f.ok()) return f.status();
    if (!(*f)->is_boolean()) return Bad(where, absl::StrCat("field '", Av(key), "' must be true or false"));
    *out = (*f)->get<bool>();
    return absl::OkStatus();
  }

  absl::Status String(const json& obj, std::string_view key, std::string_view where, std::string* out,
                      bool required = true) const {
    auto f = Field(obj, key, where, required);
    if (!f.ok()) return f.status();
    if (*f == nullptr) return absl::OkStatus();
    if (!(*f)->is_string()) return Bad(where, absl::StrCat("field '", Av(key), "' must be a string"));
    *out = (*f)->get<std::string>();
    return absl::OkStatus();
  }

  // A reference {offset, length, crc32c} into the data section.
  absl::StatusOr<Ref> GetRef(const json& obj, std::string_view key, std::string_view where,
                             bool required = true) const {
    auto f = Field(obj, key, where, required);
    if (!f.ok()) return f.status();
    Ref r;
    if (*f == nullptr) return r;
    const std::string w = absl::StrCat(Av(where), ".", Av(key));
    int64_t off = 0, len = 0, crc = 0;
    const int64_t max = std::numeric_limits<int64_t>::max();
    if (auto s = Int(**f, "offset", w, 0, max, &off); !s.ok()) return s;
    if (auto s = Int(**f, "length", w, 0, max, &len); !s.ok()) return s;
    if (auto s = Int(**f, "crc32c", w, 0, std::numeric_limits<uint32_t>::max(), &crc); !s.ok()) return s;
    const auto uoff = static_cast<uint64_t>(off), ulen = static_cast<uint64_t>(len);
    if (uoff % kNibbleAlign != 0) {
      return Bad(w, absl::StrCat("offset ", uoff, " is not a multiple of ", kNibbleAlign));
    }
    if (uoff > h_.data_length || ulen > h_.data_length - uoff) {
      return absl::DataLossError(absl::StrCat(path(), ": ", w, ": bytes [", uoff, ", +", ulen,
                                              ") of the data section point past the end of the file (data "
                                              "section is ",
                                              h_.data_length, " bytes)"));
    }
    r.data = file_.data() + h_.data_offset + uoff;
    r.length = ulen;
    r.crc32c = static_cast<uint32_t>(crc);
    r.present = true;
    return r;
  }

  absl::Status VerifyCrc(const Ref& r, std::string_view where) const {
    if (!r.present) return absl::OkStatus();
    const uint32_t got = Crc32c(r.data, r.length);
    if (got != r.crc32c) {
      return absl::DataLossError(absl::StrFormat("%s: %s: checksum mismatch (stored crc32c 0x%08x, computed 0x%08x)",
                                                 path(), Av(where), r.crc32c, got));
    }
    return absl::OkStatus();
  }

  // A list of byte strings (count u32 lengths, then the bytes). Always verified.
  absl::Status Strings(const json& obj, std::string_view key, std::string_view where,
                       std::vector<std::string>* out) const {
    auto r = GetRef(obj, key, where, /*required=*/false);
    if (!r.ok()) return r.status();
    if (!r->present) return absl::OkStatus();
    const std::string w = absl::StrCat(Av(where), ".", Av(key));
    if (auto s = VerifyCrc(*r, w); !s.ok()) return s;
    int64_t count = 0;
    if (auto s = Int(**Field(obj, key, where), "count", w, 0, static_cast<int64_t>(r->length / 4), &count); !s.ok()) {
      return s;
    }
    uint64_t total = 4 * static_cast<uint64_t>(count);
    for (int64_t i = 0; i < count && total <= r->length; ++i) {
      uint32_t len;
      std::memcpy(&len, r->data + 4 * i, 4);
      total += len;  // no overflow: total <= length < 2^63 before adding < 2^32
    }
    if (total != r->length) {
      return Bad(w, absl::StrCat(count, " strings need ", total, " bytes, the array has ", r->length));
    }
    out->resize(static_cast<size_t>(count));
    const uint8_t* p = r->data + 4 * count;
    for (int64_t i = 0; i < count; ++i) {
      uint32_t len;
      std::memcpy(&len, r->data + 4 * i, 4);
      (*out)[i].assign(reinterpret_cast<const char*>(p), len);
      p += len;
    }
    return absl::OkStatus();
  }

 private:
  const MappedFile& file_;
  const nbl::Header& h_;
};

absl::StatusOr<nbl::Header> ReadHeader(const MappedFile& f) {
  const std::string& path = f.path();
  const uint8_t* d = f.data();
  if (f.size() < 4 || !LooksLikeNibbleFile(d, f.size())) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a nibble model file (bad magic, expected \"NIBL\")"));
  }
  nbl::Header h;
  if (f.size() >= 8) std::memcpy(&h.version, d + nbl::kOffVersion, 4);
  if (f.size() >= 8 && (h.version < kNibbleMinVersion || h.version > kNibbleVersion)) {
    return absl::UnimplementedError(absl::StrCat(path, ": unsupported nibble file version ", h.version,
                                                 " (this build reads versions ", kNibbleMinVersion, " to ",
                                                 kNibbleVersion, ")"));
  }
  if (f.size() < kNibbleHeaderSize) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: the file has ", f.size(), " bytes, less than the ",
                                            kNibbleHeaderSize, "-byte header"));
  }
  uint32_t stored = 0;
  std::memcpy(&stored, d + nbl::kOffHeaderCrc, 4);
  if (const uint32_t got = Crc32c(d, nbl::kOffHeaderCrc); got != stored) {
    return absl::DataLossError(
        absl::StrFormat("%s: header checksum mismatch (stored crc32c 0x%08x, computed 0x%08x)", path, stored, got));
  }
  std::memcpy(&h.json_offset, d + nbl::kOffJsonOffset, 8);
  std::memcpy(&h.json_length, d + nbl::kOffJsonLength, 8);
  std::memcpy(&h.data_offset, d + nbl::kOffDataOffset, 8);
  std::memcpy(&h.data_length, d + nbl::kOffDataLength, 8);
  std::memcpy(&h.json_crc32c, d + nbl::kOffJsonCrc, 4);
  std::memcpy(&h.flags, d + nbl::kOffFlags, 4);
  if (h.flags != 0) {
    return absl::UnimplementedError(absl::StrCat(path, ": unknown header flags 0x", absl::Hex(h.flags)));
  }
  // Layout first (independent of the file size, overflow-safe), then the size.
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  if (h.json_offset < kNibbleHeaderSize || h.json_length > kMax - h.json_offset || h.data_offset % kNibbleAlign != 0 ||
      h.data_offset < h.json_offset + h.json_length || h.data_length > kMax - h.data_offset) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": inconsistent header: JSON at [", h.json_offset, ", +",
                                                   h.json_length, "), data at [", h.data_offset, ", +", h.data_length,
                                                   ")"));
  }
  const uint64_t size = f.size(), want = h.data_offset + h.data_length;
  if (size < want) {
    return absl::DataLossError(
        absl::StrCat(path, ": truncated: the header describes ", want, " bytes, the file has ", size));
  }
  if (size > want) {
    return absl::DataLossError(absl::StrCat(path, ": ", size - want, " unexpected bytes after the end of the data (",
                                            want, " bytes described by the header)"));
  }
  if (const uint32_t got = Crc32c(d + h.json_offset, h.json_length); got != h.json_crc32c) {
    return absl::DataLossError(absl::StrFormat(
        "%s: JSON directory checksum mismatch (stored crc32c 0x%08x, computed 0x%08x)", path, h.json_crc32c, got));
  }
  return h;
}

absl::Status ReadConfig(const Reader& r, const json& doc, uint32_t version, ModelConfig* c) {
  auto cj = r.Field(doc, "config", "JSON");
  if (!cj.ok()) return cj.status();
  const json& j = **cj;
  const char* w = "config";
  std::string style;
  for (auto s : {r.String(j, "architecture", w, &c->architecture), r.Int(j, "dim", w, &c->dim),
                 r.Int(j, "hidden_dim", w, &c->hidden_dim), r.Int(j, "n_layers", w, &c->n_layers),
                 r.Int(j, "n_heads", w, &c->n_heads), r.Int(j, "n_kv_heads", w, &c->n_kv_heads),
                 r.Int(j, "head_dim", w, &c->head_dim), r.Int(j, "vocab_size", w, &c->vocab_size),
                 r.Int(j, "max_seq_len", w, &c->max_seq_len), r.Float(j, "norm_eps", w, &c->norm_eps),
                 r.Float(j, "rope_theta", w, &c->rope_theta), r.Int(j, "rope_dim", w, &c->rope_dim),
                 r.String(j, "rope_style", w, &style), r.Bool(j, "tied_embeddings", w, &c->tied_embeddings)}) {
    if (!s.ok()) return s;
  }
  auto rs = nbl::ParseRopeStyle(style);
  if (!rs) return r.Bad(w, absl::StrCat("unknown rope_style '", style, "'"));
  c->rope_style = *rs;
  for (auto [key, dst] : {std::pair{"residual_rotation", &c->residual_rotation}, {"ffn_rotation", &c->ffn_rotation}}) {
    if (!j.contains(key)) continue;
    if (version < 2) return r.Bad(w, absl::StrCat(key, " needs file version 2"));
    int64_t seed = 0;
    if (auto s = r.Int(j, key, w, 1, int64_t{1} << 53, &seed); !s.ok()) return s;
    *dst = static_cast<uint64_t>(seed);
  }
  return c->Validate(r.path());
}

absl::Status ReadVocab(const Reader& r, const json& doc, int vocab_size, VocabSpec* v) {
  auto tj = r.Field(doc, "tokenizer", "JSON");
  if (!tj.ok()) return tj.status();
  const json& j = **tj;
  const char* w = "tokenizer";
  std::string kind;
  auto eog = r.Field(j, "eog_ids", w);
  if (!eog.ok()) return eog.status();
  for (auto s : {r.String(j, "kind", w, &kind), r.String(j, "pre", w, &v->pre),
                 r.String(j, "sp_model_path", w, &v->sp_model_path), r.Int(j, "bos_id", w, &v->bos_id),
                 r.Int(j, "eos_id", w, &v->eos_id), r.Int(j, "unk_id", w, &v->unk_id),
                 r.Int(j, "pad_id", w, &v->pad_id), r.Bool(j, "add_bos", w, &v->add_bos),
                 r.Bool(j, "add_eos", w, &v->add_eos), r.Bool(j, "add_space_prefix", w, &v->add_space_prefix),
                 r.Bool(j, "strip_space_after_bos", w, &v->strip_space_after_bos),
                 r.Int(j, "max_token_len", w, &v->max_token_len), r.Strings(j, "tokens", w, &v->tokens),
                 r.Strings(j, "merges", w, &v->merges)}) {
    if (!s.ok()) return s;
  }
  auto k = nbl::ParseTokenizerKind(kind);
  if (!k) return r.Bad(w, absl::StrCat("unknown tokenizer kind '", kind, "'"));
  v->kind = *k;
  if (!(*eog)->is_array()) return r.Bad(w, "eog_ids must be an array");
  for (const json& e : **eog) {
    if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= vocab_size) {
      return r.Bad(w, absl::StrCat("eog_ids entry ", e.dump().substr(0, 40), " is not a token id"));
    }
    v->eog_ids.push_back(static_cast<int32_t>(e.get<int64_t>()));
  }
  for (const char* key : {"scores", "token_types"}) {
    auto ref = r.GetRef(j, key, w, /*required=*/false);
    if (!ref.ok()) return ref.status();
    if (!ref->present) continue;
    const std::string wk = absl::StrCat(w, ".", key);
    if (auto s = r.VerifyCrc(*ref, wk); !s.ok()) return s;
    if (ref->length % 4 != 0) return r.Bad(wk, absl::StrCat("length ", ref->length, " is not a multiple of 4"));
    const size_t n = ref->length / 4;
    if (key[0] == 's') {
      v->scores.resize(n);
      std::memcpy(v->scores.data(), ref->data, ref->length);
    } else {
      v->token_types.resize(n);
      std::memcpy(v->token_types.data(), ref->data, ref->length);
    }
  }
  auto sp = r.GetRef(j, "sp_model", w, /*required=*/v->kind == TokenizerKind::kSentencePieceModel);
  if (!sp.ok()) return sp.status();
  if (sp->present) {
    if (auto s = r.VerifyCrc(*sp, "tokenizer.sp_model"); !s.ok()) return s;
    v->sp_model_bytes.assign(reinterpret_cast<const char*>(sp->data), sp->length);
  }
  return nbl::ValidateVocab(*v, vocab_size, r.path());
}

// One entry of the tensors table, matched to its slot.
struct TensorJob {
  const json* entry = nullptr;
  std::string name;
  HostTensor* slot = nullptr;
};

absl::Status LoadTensor(const Reader& r, const TensorJob& job, const std::shared_ptr<const MappedFile>& file,
                        bool verify, bool keep_f16) {
  const json& e = *job.entry;
  const std::string w = absl::StrCat("tensor '", job.name, "'");
  HostTensor t;
  t.name = job.name;
  if (auto s = r.String(e, "source_name", w, &t.name, /*required=*/false); !s.ok()) return s;
  auto shape = r.Field(e, "shape", w);
  if (!shape.ok()) return shape.status();
  if (!(*shape)->is_array() || (*shape)->empty() || (*shape)->size() > 4) {
    return r.Bad(w, "shape must be an array of 1 to 4 dimensions");
  }
  int64_t numel = 1;
  for (const json& d : **shape) {
    if (!d.is_number_integer() || d.get<int64_t>() <= 0 || d.get<int64_t>() > (int64_t{1} << 32) ||
        numel > (int64_t{1} << 40) / d.get<int64_t>()) {
      return r.Bad(w, absl::StrCat("bad shape ", (*shape)->dump().substr(0, 80)));
    }
    t.shape.push_back(d.get<int64_t>());
    numel *= d.get<int64_t>();
  }
  std::string storage;
  if (auto s = r.String(e, "storage", w, &storage); !s.ok()) return s;
  if (storage == "f32" || storage == "f16") {
    const uint64_t elem = storage == "f32" ? 4 : 2;
    auto ref = r.GetRef(e, "data", w);
    if (!ref.ok()) return ref.status();
    if (ref->length != static_cast<uint64_t>(numel) * elem) {
      return r.Bad(w, absl::StrCat(storage, " data has ", ref->length, " bytes, the shape needs ", numel * elem));
    }
    if (verify) {
      if (auto s = r.VerifyCrc(*ref, w); !s.ok()) return s;
    }
    if (elem == 4) {
      const auto* p = reinterpret_cast<const float*>(ref->data);
      t.data.assign(p, p + numel);
    } else if (keep_f16 && t.shape.size() == 2) {
      // 64-byte aligned in the mapping (checked by GetRef), so a valid uint16_t view.
      t.f16 = {reinterpret_cast<const uint16_t*>(ref->data), static_cast<size_t>(numel)};
      t.owner = file;
    } else {
      t.data.resize(static_cast<size_t>(numel));
      for (int64_t i = 0; i < numel; ++i) {
        uint16_t h;
        std::memcpy(&h, ref->data + 2 * i, 2);
        t.data[i] = Fp16ToFp32(h);
      }
    }
    *job.slot = std::move(t);
    return absl::OkStatus();
  }
  if (storage != "quant") return r.Bad(w, absl::StrCat("unknown storage '", storage, "'"));
  if (t.shape.size() != 2) return r.Bad(w, "a quantized tensor must be 2-D");
  auto q = std::make_shared<QuantTensor>();
  q->rows = t.rows();
  q->cols = t.cols();
  q->owners.push_back(file);
  auto segs = r.Field(e, "segments", w);
  if (!segs.ok()) return segs.status();
  if (!(*segs)->is_array() || (*segs)->empty() || (*segs)->size() > static_cast<size_t>(q->rows)) {
    return r.Bad(w, "segments must be a non-empty array with at most one segment per row");
  }
  for (size_t i = 0; i < (*segs)->size(); ++i) {
    const json& sj = (**segs)[i];
    const std::string ws = absl::StrCat(w, " segment ", i);
    QuantSegment seg;
    std::string fname;
    for (auto s : {r.Int(sj, "row_begin", ws, 0, q->rows, &seg.row_begin),
                   r.Int(sj, "row_end", ws, 0, q->rows, &seg.row_end), r.String(sj, "format", ws, &fname)}) {
      if (!s.ok()) return s;
    }
    auto f = fmt::Format::Parse(fname);
    if (!f) return r.Bad(ws, absl::StrCat("unknown format name '", fname, "'"));
    seg.format = *f;
    auto ref = r.GetRef(sj, "data", ws);
    if (!ref.ok()) return ref.status();
    if (verify) {
      if (auto s = r.VerifyCrc(*ref, ws); !s.ok()) return s;
    }
    seg.data = std::span<const uint8_t>(ref->data, ref->length);
    q->segments.push_back(seg);
  }
  auto side = r.Field(e, "sidecar", w, /*required=*/false);
  if (!side.ok()) return side.status();
  if (*side != nullptr) {
    const std::string wc = w + " side-car";
    std::string type;
    int64_t nnz = 0;
    if (auto s = r.String(**side, "type", wc, &type); !s.ok()) return s;
    auto st = nbl::ParseSidecarType(type);
    if (!st) return r.Bad(wc, absl::StrCat("unknown side-car type '", type, "'"));
    if (auto s = r.Int(**side, "nnz", wc, 0, std::numeric_limits<uint32_t>::max(), &nnz); !s.ok()) return s;
    Sidecar& sc = q->sidecar;
    sc.type = *st;
    const bool i8 = sc.type == Sidecar::ValueType::kI8;
    enum Array { kRowPtr, kCol, kValues, kRowScale };
    struct Spec {
      Array which;
      const char* key;
      uint64_t elem;  // bytes per entry
      bool required;
    };
    for (const Spec& spec : {Spec{kRowPtr, "row_ptr", 4, true}, Spec{kCol, "col", 2, true},
                             Spec{kValues, "values", i8 ? 1u : 2u, true}, Spec{kRowScale, "row_scale", 2, i8}}) {
      const std::string wk = absl::StrCat(wc, ".", spec.key);
      auto ref = r.GetRef(**side, spec.key, wc, spec.required && sc.type != Sidecar::ValueType::kNone);
      if (!ref.ok()) return ref.status();
      if (!ref->present) continue;
      if (ref->length % spec.elem != 0) {
        return r.Bad(wk, absl::StrCat("length ", ref->length, " is not a multiple of ", spec.elem));
      }
      if (verify) {
        if (auto s = r.VerifyCrc(*ref, wk); !s.ok()) return s;
      }
      // Aligned: the mapping is page-aligned and every offset a multiple of 64.
      const size_t n = ref->length / spec.elem;
      const auto* u16 = reinterpret_cast<const uint16_t*>(ref->data);
      switch (spec.which) {
        case kRowPtr:
          sc.row_ptr = {reinterpret_cast<const uint32_t*>(ref->data), n};
          break;
        case kCol:
          sc.col = {u16, n};
          break;
        case kValues:
          if (i8) {
            sc.i8 = {reinterpret_cast<const int8_t*>(ref->data), n};
          } else {
            sc.f16 = {u16, n};
          }
          break;
        case kRowScale:
          sc.row_scale = {u16, n};
          break;
      }
    }
    if (sc.col.size() != static_cast<size_t>(nnz)) {
      return r.Bad(wc, absl::StrCat("nnz is ", nnz, " but col has ", sc.col.size(), " entries"));
    }
  }
  if (auto s = nbl::ValidateQuant(*q, q->rows, q->cols, job.name, r.path()); !s.ok()) return s;
  t.quant = std::move(q);
  *job.slot = std::move(t);
  return absl::OkStatus();
}

absl::Status ReadTensors(const Reader& r, const json& doc, const std::shared_ptr<const MappedFile>& file,
                         const NibbleLoadOptions& opts, LoadedModel* m) {
  auto tj = r.Field(doc, "tensors", "JSON");
  if (!tj.ok()) return tj.status();
  if (!(*tj)->is_array()) return r.Bad("tensors", "must be an array");
  m->weights.layers.resize(static_cast<size_t>(m->config.n_layers));
  std::map<std::string, HostTensor*> slots;
  nbl::ForEachSlot(m->weights, [&](const std::string& name, HostTensor& t) { slots[name] = &t; });
  std::vector<TensorJob> jobs;
  std::map<std::string, bool> seen;
  for (size_t i = 0; i < (*tj)->size(); ++i) {
    TensorJob job;
    job.entry = &(**tj)[i];
    if (auto s = r.String(*job.entry, "name", absl::StrCat("tensors[", i, "]"), &job.name); !s.ok()) return s;
    auto it = slots.find(job.name);
    if (it == slots.end())
      return r.Bad(absl::StrCat("tensors[", i, "]"), absl::StrCat("unknown tensor '", job.name, "'"));
    if (seen[job.name])
      return r.Bad(absl::StrCat("tensors[", i, "]"), absl::StrCat("duplicate tensor '", job.name, "'"));
    seen[job.name] = true;
    job.slot = it->second;
    jobs.push_back(std::move(job));
  }
  for (const auto& [name, t] : slots) {
    if (!seen[name] && !(name == "output" && m->config.tied_embeddings)) {
      return r.Bad("tensors", absl::StrCat("tensor '", name, "' is missing"));
    }
  }
  if (auto s = ParallelFor(
          jobs.size(), [&](size_t i) { return LoadTensor(r, jobs[i], file, opts.verify_tensor_checksums, opts.keep_f16); }, 4);
      !s.ok()) {
    return s;
  }
  return m->weights.Validate(m->config, r.path());
}

}  // namespace

absl::StatusOr<LoadedModel> LoadNibbleFile(const std::string& path, const NibbleLoadOptions& opts) {
  auto opened = MappedFile::Open(path);
  if (!opened.ok()) return opened.status();
  std::shared_ptr<const MappedFile> file(std::move(*opened));
  auto h = ReadHeader(*file);
  if (!h.ok()) return h.status();
  const Reader r(*file, *h);
  const char* text = reinterpret_cast<const char*>(file->data() + h->json_offset);
  const json doc = json::parse(text, text + h->json_length, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) return r.Bad("JSON directory", "not a valid JSON object");
  std::string format;
  int64_t version = 0;
  if (auto s = r.String(doc, "format", "JSON", &format); !s.ok()) return s;
  if (auto s = r.Int(doc, "version", "JSON", 0, std::numeric_limits<uint32_t>::max(), &version); !s.ok()) return s;
  if (format != "nibble" || version != h->version) {
    return r.Bad("JSON", absl::StrCat("format '", format, "' version ", version, " does not match the header"));
  }
  LoadedModel m;
  m.source_path = path;
  m.source_format = "nibble";
  if (auto s = ReadConfig(r, doc, h->version, &m.config); !s.ok()) return s;
  if (auto s = ReadVocab(r, doc, m.config.vocab_size, &m.vocab); !s.ok()) return s;
  if (auto s = r.String(doc, "chat_template", "JSON", &m.chat_template); !s.ok()) return s;
  auto meta = r.Field(doc, "metadata", "JSON");
  if (!meta.ok()) return meta.status();
  if (!(*meta)->is_object()) return r.Bad("metadata", "must be an object");
  for (auto it = (*meta)->begin(); it != (*meta)->end(); ++it) {
    if (!it.value().is_string()) return r.Bad("metadata", absl::StrCat("value of '", it.key(), "' is not a string"));
    m.metadata[it.key()] = it.value().get<std::string>();
  }
  if (auto s = ReadTensors(r, doc, file, opts, &m); !s.ok()) return s;
  return m;
}

}  // namespace nibble::io
