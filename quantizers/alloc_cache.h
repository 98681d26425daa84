// A file cache of the bit allocator's expensive half, so one model can be
// allocated at many budgets (a quality sweep, a user trying sizes) paying the
// sensitivity probes and per-candidate error estimates once.
//
// What is stored (JSON): the key, the unweighted per-(tensor, row block,
// candidate) bits/errors (AllocEstimates), the per-tensor sensitivity weights
// and the externally measured options (embedding / head KLD costs). What the
// key covers: a CRC32C of every weight the estimates read (the fp32 linear,
// embedding and output matrices), the calibration text's path, size and token
// settings, and every allocation/GPTQ option that changes an estimate. A file
// whose key differs is ignored (and overwritten), never trusted.
// Non-goals: caching the calibration Hessians themselves (they are recomputed;
// the final quantization needs them anyway), cross-version compatibility
// (the version is part of the key).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"
#include "quantizers/bit_allocation.h"

namespace nibble {

struct AllocCacheEntry {
  std::string key;
  AllocEstimates estimates;
  std::vector<double> weights;     // per tensor of `estimates`
  std::vector<AllocExtra> extras;  // with their measured costs
};

// The key for `m` (fp32 weights, before quantization) and these settings.
// `settings` is a caller-built description of every option that matters.
std::string AllocCacheKey(const LoadedModel& m, const std::string& calib_path, const std::string& settings);

// NOT_FOUND if the file does not exist or its key differs (the caller then
// recomputes); DATA_LOSS for a file that is not a valid cache (named).
absl::StatusOr<AllocCacheEntry> LoadAllocCache(const std::string& path, const std::string& key);
// Writes atomically (temp file + rename). Errors name the path.
absl::Status SaveAllocCache(const std::string& path, const AllocCacheEntry& e);

// The half of the expensive work that does not depend on the candidate lists
// or the estimate settings: the per-matrix sensitivity weights (KLD probes of
// the full-precision model) and the measured embedding/head costs, per
// format measured so far. Stored beside the allocation cache (its path +
// ".sens.json") under a key without the candidate lists, so a run with other
// candidates (or other GPTQ estimate settings) pays only its new estimates
// and the embedding formats not measured yet.
struct SensitivityCacheEntry {
  std::string key;
  std::vector<double> weights;     // per linear matrix, in allocation order
  std::vector<AllocExtra> extras;  // per embedding/head: formats measured so far and their costs
};
absl::StatusOr<SensitivityCacheEntry> LoadSensitivityCache(const std::string& path, const std::string& key);
absl::Status SaveSensitivityCache(const std::string& path, const SensitivityCacheEntry& e);

}  // namespace nibble
