#include "engine/core/config.h"

#include "absl/strings/str_cat.h"

namespace nibble {

absl::Status ModelConfig::Validate(const std::string& source) const {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid model config: ", what));
  };
  constexpr int kMax = 1 << 20;
  if (dim <= 0 || dim > kMax) return bad(absl::StrCat("dim=", dim));
  if (hidden_dim <= 0 || hidden_dim > 8 * kMax) return bad(absl::StrCat("hidden_dim=", hidden_dim));
  if (n_layers <= 0 || n_layers > 1024) return bad(absl::StrCat("n_layers=", n_layers));
  if (n_heads <= 0 || n_heads > 4096) return bad(absl::StrCat("n_heads=", n_heads));
  if (n_kv_heads <= 0 || n_kv_heads > n_heads || n_heads % n_kv_heads != 0)
    return bad(absl::StrCat("n_kv_heads=", n_kv_heads, " with n_heads=", n_heads));
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 4096) return bad(absl::StrCat("head_dim=", head_dim));
  if (rope_dim <= 0 || rope_dim > head_dim || rope_dim % 2 != 0) return bad(absl::StrCat("rope_dim=", rope_dim));
  if (vocab_size <= 0 || vocab_size > (1 << 24)) return bad(absl::StrCat("vocab_size=", vocab_size));
  if (max_seq_len <= 0 || max_seq_len > (1 << 24)) return bad(absl::StrCat("max_seq_len=", max_seq_len));
  if (!(norm_eps > 0.0f) || norm_eps > 1.0f) return bad(absl::StrCat("norm_eps=", norm_eps));
  if (!(rope_theta > 0.0f)) return bad(absl::StrCat("rope_theta=", rope_theta));
  return absl::OkStatus();
}

}  // namespace nibble
