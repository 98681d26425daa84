#include "quantizers/alloc_cache.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/io/nibble_file.h"
#include "nlohmann/json.hpp"
#include "quantizers/calibration.h"

namespace nibble {
namespace {

constexpr int kCacheVersion = 1;

uint32_t TensorCrc(const HostTensor& t, uint32_t crc) {
  if (!t.data.empty()) crc = io::Crc32c(t.data.data(), t.data.size() * sizeof(float), crc);
  return crc;
}

}  // namespace

std::string AllocCacheKey(const LoadedModel& m, const std::string& calib_path, const std::string& settings) {
  uint32_t crc = TensorCrc(m.weights.tok_embeddings, 0);
  crc = TensorCrc(m.weights.output, crc);
  for (const LayerWeights& l : m.weights.layers)
    for (LinearWeight w : kAllLinearWeights) crc = TensorCrc(WeightOf(l, w), crc);
  std::error_code ec;
  const auto size = std::filesystem::file_size(calib_path, ec);
  return absl::StrFormat("v%d;weights_crc32c=%08x;calib=%s;calib_bytes=%d;%s", kCacheVersion, crc, calib_path,
                         ec ? -1 : static_cast<int64_t>(size), settings);
}

namespace {

bool ParseFormats(const nlohmann::json& a, std::vector<fmt::Format>* out) {
  if (!a.is_array()) return false;
  for (const auto& n : a) {
    if (!n.is_string()) return false;
    auto f = fmt::Format::Parse(n.get<std::string>());
    if (!f) return false;
    out->push_back(*f);
  }
  return true;
}

bool ParseOptions(const nlohmann::json& bits, const nlohmann::json& err, size_t n, std::vector<KnapsackOption>* out) {
  if (!bits.is_array() || !err.is_array() || bits.size() != n || err.size() != n) return false;
  for (size_t k = 0; k < n; ++k) {
    if (!bits[k].is_number() || !err[k].is_number()) return false;
    out->push_back({bits[k].get<double>(), err[k].get<double>()});
  }
  return true;
}

// [{name, formats, bits, err}] <-> AllocExtra.
bool ParseExtras(const nlohmann::json& a, std::vector<AllocExtra>* out) {
  if (!a.is_array()) return false;
  for (const auto& x : a) {
    AllocExtra ex;
    if (!x.is_object() || !x.contains("name") || !x["name"].is_string() || !x.contains("formats") ||
        !ParseFormats(x["formats"], &ex.formats) || !x.contains("bits") || !x.contains("err") ||
        !ParseOptions(x["bits"], x["err"], ex.formats.size(), &ex.costs))
      return false;
    ex.name = x["name"].get<std::string>();
    out->push_back(std::move(ex));
  }
  return true;
}

nlohmann::json DumpExtras(const std::vector<AllocExtra>& extras) {
  nlohmann::json a = nlohmann::json::array();
  for (const AllocExtra& x : extras) {
    nlohmann::json jx;
    jx["name"] = x.name;
    jx["formats"] = nlohmann::json::array();
    jx["bits"] = nlohmann::json::array();
    jx["err"] = nlohmann::json::array();
    for (const fmt::Format& f : x.formats) jx["formats"].push_back(f.Name());
    for (const KnapsackOption& o : x.costs) {
      jx["bits"].push_back(o.bits);
      jx["err"].push_back(o.err);
    }
    a.push_back(std::move(jx));
  }
  return a;
}

absl::Status WriteJsonAtomically(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot write the allocation cache"));
    out << j.dump(1);
    out.flush();
    if (!out) return absl::DataLossError(absl::StrCat(tmp, ": write failed"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot rename the allocation cache: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<AllocCacheEntry> LoadAllocCache(const std::string& path, const std::string& key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": no allocation cache"));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError(absl::StrCat(path, ": not a JSON allocation cache"));
  auto bad = [&](const char* what) { return absl::DataLossError(absl::StrCat(path, ": allocation cache: bad ", what)); };
  if (!j.contains("key") || !j["key"].is_string()) return bad("key");
  if (j["key"].get<std::string>() != key) return absl::NotFoundError(absl::StrCat(path, ": cache is for other settings"));
  AllocCacheEntry e;
  e.key = key;
  if (!j.contains("candidates") || !ParseFormats(j["candidates"], &e.estimates.candidates)) return bad("candidates");
  const size_t nc = e.estimates.candidates.size();
  if (!j.contains("tensors") || !j["tensors"].is_array()) return bad("tensors");
  for (const auto& t : j["tensors"]) {
    if (!t.is_object() || !t.contains("name") || !t["name"].is_string() || !t.contains("blocks") ||
        !t["blocks"].is_array() || !t.contains("weight") || !t["weight"].is_number())
      return bad("tensor");
    e.estimates.names.push_back(t["name"].get<std::string>());
    e.weights.push_back(t["weight"].get<double>());
    auto& rb = e.estimates.row_blocks.emplace_back();
    auto& costs = e.estimates.costs.emplace_back();
    for (const auto& b : t["blocks"]) {
      if (!b.is_object() || !b.contains("rows") || !b["rows"].is_array() || b["rows"].size() != 2 ||
          !b["rows"][0].is_number_integer() || !b["rows"][1].is_number_integer() || !b.contains("bits") ||
          !b.contains("err"))
        return bad("block");
      rb.push_back({b["rows"][0].get<int64_t>(), b["rows"][1].get<int64_t>()});
      if (!ParseOptions(b["bits"], b["err"], nc, &costs.emplace_back())) return bad("block options");
    }
  }
  if (j.contains("extras") && !ParseExtras(j["extras"], &e.extras)) return bad("extra");
  return e;
}

absl::Status SaveAllocCache(const std::string& path, const AllocCacheEntry& e) {
  const AllocEstimates& est = e.estimates;
  if (est.names.size() != est.costs.size() || est.row_blocks.size() != est.costs.size() ||
      e.weights.size() != est.costs.size())
    return absl::InvalidArgumentError("allocation cache: inconsistent entry");
  nlohmann::json j;
  j["key"] = e.key;
  for (const fmt::Format& f : est.candidates) j["candidates"].push_back(f.Name());
  j["tensors"] = nlohmann::json::array();
  for (size_t t = 0; t < est.costs.size(); ++t) {
    nlohmann::json jt;
    jt["name"] = est.names[t];
    jt["weight"] = e.weights[t];
    jt["blocks"] = nlohmann::json::array();
    for (size_t b = 0; b < est.costs[t].size(); ++b) {
      nlohmann::json jb;
      jb["rows"] = {est.row_blocks[t][b].first, est.row_blocks[t][b].second};
      for (const KnapsackOption& o : est.costs[t][b]) {
        jb["bits"].push_back(o.bits);
        jb["err"].push_back(o.err);
      }
      jt["blocks"].push_back(std::move(jb));
    }
    j["tensors"].push_back(std::move(jt));
  }
  j["extras"] = DumpExtras(e.extras);
  return WriteJsonAtomically(path, j);
}

absl::StatusOr<SensitivityCacheEntry> LoadSensitivityCache(const std::string& path, const std::string& key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": no sensitivity cache"));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const char* what) { return absl::DataLossError(absl::StrCat(path, ": sensitivity cache: bad ", what)); };
  if (j.is_discarded() || !j.is_object()) return bad("JSON");
  if (!j.contains("key") || !j["key"].is_string()) return bad("key");
  if (j["key"].get<std::string>() != key) return absl::NotFoundError(absl::StrCat(path, ": cache is for other settings"));
  SensitivityCacheEntry e;
  e.key = key;
  if (!j.contains("weights") || !j["weights"].is_array()) return bad("weights");
  for (const auto& w : j["weights"]) {
    if (!w.is_number()) return bad("weight");
    e.weights.push_back(w.get<double>());
  }
  if (j.contains("extras") && !ParseExtras(j["extras"], &e.extras)) return bad("extras");
  return e;
}

absl::Status SaveSensitivityCache(const std::string& path, const SensitivityCacheEntry& e) {
  nlohmann::json j;
  j["key"] = e.key;
  j["weights"] = e.weights;
  j["extras"] = DumpExtras(e.extras);
  return WriteJsonAtomically(path, j);
}

}  // namespace nibble
