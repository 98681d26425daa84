#include "quantizers/calibration.h"

#include <algorithm>
#include <functional>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "engine/io/mapped_file.h"
#include "engine/util/log.h"

namespace nibble {

LinearInput InputOf(LinearWeight w) {
  switch (w) {
    case LinearWeight::kWq:
    case LinearWeight::kWk:
    case LinearWeight::kWv: return LinearInput::kAttnIn;
    case LinearWeight::kWo: return LinearInput::kAttnOut;
    case LinearWeight::kGate:
    case LinearWeight::kUp: return LinearInput::kFfnIn;
    case LinearWeight::kDown: return LinearInput::kFfnMid;
  }
  return LinearInput::kAttnIn;
}

const char* LinearWeightName(LinearWeight w) {
  switch (w) {
    case LinearWeight::kWq: return "wq";
    case LinearWeight::kWk: return "wk";
    case LinearWeight::kWv: return "wv";
    case LinearWeight::kWo: return "wo";
    case LinearWeight::kGate: return "w_gate";
    case LinearWeight::kUp: return "w_up";
    case LinearWeight::kDown: return "w_down";
  }
  return "?";
}

HostTensor& MutableWeightOf(LayerWeights& l, LinearWeight w) {
  switch (w) {
    case LinearWeight::kWq: return l.wq;
    case LinearWeight::kWk: return l.wk;
    case LinearWeight::kWv: return l.wv;
    case LinearWeight::kWo: return l.wo;
    case LinearWeight::kGate: return l.w_gate;
    case LinearWeight::kUp: return l.w_up;
    case LinearWeight::kDown: return l.w_down;
  }
  return l.wq;
}

const HostTensor& WeightOf(const LayerWeights& l, LinearWeight w) {
  return MutableWeightOf(const_cast<LayerWeights&>(l), w);
}

const Hessian* CalibrationStats::Get(int layer, LinearInput which) const {
  const int k = static_cast<int>(which);
  if (layer < 0 || static_cast<size_t>(layer) >= hessians.size() || k < 0 || k >= kNumLinearInputs) return nullptr;
  const Hessian& h = hessians[layer][k];
  return h.dim > 0 ? &h : nullptr;
}

HessianCollector::HessianCollector(const CollectorOptions& opts)
    : opts_(opts) {}

HessianCollector::~HessianCollector() = default;

void HessianCollector::OnLinearInput(int layer, LinearInput which, const float* x, int n_tokens, int width) {
  if (!status_.ok()) return;
  const int k = static_cast<int>(which);
  if (layer < 0 || layer > (1 << 16) || k < 0 || k >= kNumLinearInputs || width <= 0 ||
      width > kMaxHessianDim || n_tokens < 0) {
    status_ = absl::InvalidArgumentError(absl::StrCat("HessianCollector: bad observation (layer ", layer,
                                                      ", input ", k, ", width ", width, ")"));
    return;
  }
  if (layer < opts_.layer_begin || (opts_.layer_end >= 0 && layer >= opts_.layer_end)) return;
  if (static_cast<size_t>(layer) >= acc_.size()) acc_.resize(layer + 1);
  std::unique_ptr<HessianAccumulator>& a = acc_[layer][k];
  if (a == nullptr) a = std::make_unique<HessianAccumulator>(width);
  if (a->dim() != width) {
    status_ = absl::InvalidArgumentError(absl::StrCat("HessianCollector: layer ", layer, " input ", k,
                                                      " changed width from ", a->dim(), " to ", width));
    return;
  }
  a->Add(x, n_tokens, opts_.n_threads);
}

absl::StatusOr<CalibrationStats> HessianCollector::Finish() const {
  if (!status_.ok()) return status_;
  CalibrationStats s;
  s.hessians.resize(acc_.size());
  for (size_t l = 0; l < acc_.size(); ++l) {
    for (int k = 0; k < kNumLinearInputs; ++k) {
      if (acc_[l][k] == nullptr) continue;
      s.hessians[l][k] = acc_[l][k]->Finish();
      s.n_tokens = std::max(s.n_tokens, s.hessians[l][k].n_tokens);
    }
  }
  return s;
}

namespace {

// Splits text into pieces to encode: documents separated by "<|endoftext|>",
// long documents cut at a newline (or space) so one Encode stays small.
class PieceReader {
 public:
  explicit PieceReader(std::string_view text) : rest_(text) {}

  // Next non-empty piece; `starts_doc` tells whether it begins a document.
  bool Next(std::string_view* piece, bool* starts_doc) {
    static constexpr std::string_view kMarker = "<|endoftext|>";
    static constexpr size_t kMaxPiece = 1 << 16;
    while (doc_.empty()) {
      if (done_) return false;
      const size_t end = rest_.find(kMarker);
      doc_ = Trim(rest_.substr(0, end));
      if (end == std::string_view::npos) {
        done_ = true;
      } else {
        rest_ = rest_.substr(end + kMarker.size());
      }
      at_doc_start_ = true;
    }
    size_t cut = doc_.size();
    if (cut > kMaxPiece) {
      cut = doc_.rfind('\n', kMaxPiece);
      if (cut == std::string_view::npos || cut == 0) cut = doc_.rfind(' ', kMaxPiece);
      if (cut == std::string_view::npos || cut == 0) {
        cut = kMaxPiece;  // no break: back up to a UTF-8 lead byte
        while (cut > 1 && (static_cast<unsigned char>(doc_[cut]) & 0xC0) == 0x80) --cut;
      }
    }
    *piece = doc_.substr(0, cut);
    doc_ = doc_.substr(cut);
    *starts_doc = at_doc_start_;
    at_doc_start_ = false;
    return true;
  }

 private:
  static std::string_view Trim(std::string_view s) {
    const auto ws = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
    while (!s.empty() && ws(s.front())) s.remove_prefix(1);
    while (!s.empty() && ws(s.back())) s.remove_suffix(1);
    return s;
  }

  std::string_view rest_, doc_;
  bool done_ = false;
  bool at_doc_start_ = true;
};

struct ObserverGuard {
  LlamaModel& m;
  ~ObserverGuard() { m.SetObserver(nullptr); }
};

}  // namespace

absl::StatusOr<CalibrationStats> Calibrate(LlamaModel& model, const Tokenizer& tokenizer,
                                           const std::string& text_path, int n_tokens, int ctx) {
  CalibrateOptions o;
  o.n_tokens = n_tokens;
  o.ctx = ctx;
  return Calibrate(model, tokenizer, text_path, o);
}

absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationChunks(const Tokenizer& tokenizer,
                                                                   const std::string& text_path,
                                                                   int64_t n_tokens, int ctx, int max_seq_len) {
  if (n_tokens <= 0 || ctx <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("calibration: n_tokens (", n_tokens, ") and ctx (", ctx, ") must be positive"));
  if (max_seq_len > 0) ctx = std::min(ctx, max_seq_len);
  const bool add_bos = tokenizer.ShouldAddBos();
  if (add_bos && ctx < 2)
    return absl::InvalidArgumentError(absl::StrCat("calibration: ctx ", ctx, " leaves no room after BOS"));
  auto file = io::MappedFile::Open(text_path);
  if (!file.ok()) return file.status();
  PieceReader reader((*file)->view());

  std::vector<int32_t> stream;  // encoded tokens not yet consumed, from `head`
  size_t head = 0;
  bool exhausted = false;
  const EncodeOptions enc{/*add_bos=*/false, /*parse_special=*/false};
  // Makes sure at least `need` tokens are buffered unless the text ran out.
  auto refill = [&](size_t need) -> absl::Status {
    while (!exhausted && stream.size() - head < need) {
      std::string_view piece;
      bool starts_doc = false;
      if (!reader.Next(&piece, &starts_doc)) {
        exhausted = true;
        break;
      }
      auto ids = tokenizer.Encode(piece, enc);
      if (!ids.ok())
        return absl::Status(ids.status().code(),
                            absl::StrCat(text_path, ": tokenizing calibration text: ", ids.status().message()));
      if (head > 0) {
        stream.erase(stream.begin(), stream.begin() + static_cast<std::ptrdiff_t>(head));
        head = 0;
      }
      if (starts_doc && add_bos) stream.push_back(tokenizer.bos_id());
      stream.insert(stream.end(), ids->begin(), ids->end());
    }
    return absl::OkStatus();
  };

  std::vector<std::vector<int32_t>> chunks;
  int64_t seen = 0;
  const int64_t min_size = add_bos ? 2 : 1;  // a lone BOS carries no text
  while (seen < n_tokens) {
    const int64_t limit = std::min<int64_t>(ctx, n_tokens - seen);
    if (limit < min_size) break;  // the budget left cannot hold BOS + text
    if (auto s = refill(static_cast<size_t>(limit)); !s.ok()) return s;
    std::vector<int32_t> chunk;
    if (add_bos && (head >= stream.size() || stream[head] != tokenizer.bos_id())) chunk.push_back(tokenizer.bos_id());
    while (static_cast<int64_t>(chunk.size()) < limit && head < stream.size()) chunk.push_back(stream[head++]);
    if (static_cast<int64_t>(chunk.size()) < min_size) break;  // text exhausted
    seen += static_cast<int64_t>(chunk.size());
    chunks.push_back(std::move(chunk));
  }
  if (seen == 0) return absl::InvalidArgumentError(absl::StrCat(text_path, ": no calibration tokens in the text"));
  if (seen < n_tokens && exhausted && head >= stream.size())
    NIBBLE_LOG(WARNING) << text_path << ": calibration text exhausted after " << seen << " of " << n_tokens
                        << " tokens";
  return chunks;
}

absl::StatusOr<CalibrationRun> RunCalibration(LlamaModel& model, const Tokenizer& tokenizer,
                                              const std::string& text_path, const CalibrateOptions& opts,
                                              ActivationObserver* observer,
                                              const std::function<absl::Status()>& check) {
  const ModelConfig& c = model.config();
  auto chunks = CalibrationChunks(tokenizer, text_path, opts.n_tokens, opts.ctx, c.max_seq_len);
  if (!chunks.ok()) return chunks.status();
  int max_len = 1;
  for (const auto& ch : *chunks) max_len = std::max(max_len, static_cast<int>(ch.size()));
  model.SetObserver(observer);
  ObserverGuard guard{model};
  auto cache = model.NewKVCache(max_len);
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  CalibrationRun run;
  for (const auto& chunk : *chunks) {
    if (auto s = model.Forward(chunk, 0, cache.get(), logits); !s.ok())
      return absl::Status(s.code(), absl::StrCat(text_path, ": calibration forward pass: ", s.message()));
    run.n_tokens += static_cast<int64_t>(chunk.size());
    ++run.n_chunks;
    if (check) {
      if (auto s = check(); !s.ok()) return s;
    }
  }
  return run;
}

absl::StatusOr<CalibrationStats> Calibrate(LlamaModel& model, const Tokenizer& tokenizer,
                                           const std::string& text_path, const CalibrateOptions& opts) {
  HessianCollector collector(opts.collector);
  auto run = RunCalibration(model, tokenizer, text_path, opts, &collector);
  if (!run.ok()) return run.status();
  auto stats = collector.Finish();
  if (!stats.ok()) return stats.status();
  stats->n_tokens = run->n_tokens;
  stats->n_chunks = run->n_chunks;
  return stats;
}

}  // namespace nibble
