#include "engine/tokenizer/gpt2_pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/util/log.h"

namespace nibble {
namespace {

// The regexes below are llama.cpp's (src/llama-vocab.cpp), as adapted there
// from the models' tokenizer.json files.

// GPT-2. llama.cpp runs this one through a hand-written splitter that also
// ends in "|\s+"; appending it here makes PCRE2 split identically.
constexpr const char* kGpt2 =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* kLlama3 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kGpt4o =
    R"([^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kTekken =
    R"([^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct PreSpec {
  std::vector<const char*> regexes;
  bool ignore_merges = false;
};

// Returns false for names we do not know.
bool LookupPre(std::string_view pre, PreSpec* out) {
  auto is = [&](std::initializer_list<std::string_view> names) {
    for (std::string_view n : names) {
      if (pre == n) return true;
    }
    return false;
  };
  if (is({"gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "jina-es", "jina-de", "jina-v1-en",
          "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe", "gigachat", "exaone4",
          "trillion", "granite-docling", "mellum", "modern-bert", "a.x-4.0"})) {
    *out = {{kGpt2}};
  } else if (is({"", "default"})) {
    *out = {{R"([\p{P}\$\+<=>\^~\|]+)", kGpt2, R"(\p{N}+)", "[0-9][0-9][0-9]"}};
  } else if (is({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})) {
    *out = {{R"(\p{N})", kGpt2}};
  } else if (is({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                 "lfm2"})) {
    *out = {{kLlama3}, /*ignore_merges=*/true};
  } else if (is({"dbrx", "smaug-bpe", "chatglm-bpe", "glm4"})) {
    *out = {{kLlama3}};
  } else if (is({"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"})) {
    *out = {{kQwen2}};
  } else if (is({"falcon"})) {
    *out = {{R"([\p{P}\$\+<=>\^~\|`]+)", kGpt2, "[0-9][0-9][0-9]"}};
  } else if (is({"gpt-4o", "llama4"})) {
    *out = {{kGpt4o}};
  } else if (is({"tekken"})) {
    *out = {{kTekken}, /*ignore_merges=*/true};
  } else {
    return false;
  }
  return true;
}

}  // namespace

struct PreTokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

PreTokenizer::~PreTokenizer() = default;

absl::StatusOr<std::unique_ptr<PreTokenizer>> PreTokenizer::Create(std::string_view pre) {
  PreSpec spec;
  std::string name(pre);
  if (!LookupPre(pre, &spec)) {
    NIBBLE_LOG(WARNING) << "BPE pre-tokenizer '" << pre
                 << "' is not supported; falling back to the gpt2 regex (tokens may differ from the model's)";
    LookupPre("gpt2", &spec);
    name = "gpt2";
  }
  std::unique_ptr<PreTokenizer> p(new PreTokenizer());
  p->name_ = name;
  p->ignore_merges_ = spec.ignore_merges;
  for (const char* pattern : spec.regexes) {
    int err = 0;
    PCRE2_SIZE err_off = 0;
    auto r = std::make_unique<Regex>();
    r->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                            PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
    if (r->code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InternalError(absl::StrCat("pre-tokenizer '", name, "': PCRE2 rejects regex at offset ",
                                              err_off, ": ", reinterpret_cast<const char*>(msg)));
    }
    pcre2_jit_compile(r->code, PCRE2_JIT_COMPLETE);  // optional speed-up; the interpreter is the fallback
    p->regexes_.push_back(std::move(r));
  }
  return p;
}

absl::Status PreTokenizer::Split(std::string_view text, std::vector<std::string_view>* words) const {
  if (text.empty()) return absl::OkStatus();
  using Span = std::pair<size_t, size_t>;  // [begin, end) byte offsets into text
  std::vector<Span> cur = {{0, text.size()}}, next;

  pcre2_match_context* mctx = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  if (mctx != nullptr && jit_stack != nullptr) pcre2_jit_stack_assign(mctx, nullptr, jit_stack);
  absl::Status status;

  for (const auto& re : regexes_) {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re->code, nullptr);
    if (md == nullptr) {
      status = absl::ResourceExhaustedError("pre-tokenizer: out of memory for PCRE2 match data");
      break;
    }
    next.clear();
    next.reserve(cur.size() * 2);
    for (const Span& frag : cur) {
      const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + frag.first);
      const size_t len = frag.second - frag.first;
      size_t emitted = 0;  // end of the last fragment pushed, relative to frag
      size_t offset = 0;
      while (offset < len) {
        int rc = pcre2_match(re->code, subject, len, offset, PCRE2_NO_UTF_CHECK, md, mctx);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
          PCRE2_UCHAR msg[256];
          pcre2_get_error_message(rc, msg, sizeof(msg));
          status = absl::InternalError(absl::StrCat("pre-tokenizer '", name_, "': PCRE2 match failed: ",
                                                    reinterpret_cast<const char*>(msg)));
          break;
        }
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        const size_t ms = ov[0], me = ov[1];
        if (me <= ms) {
          // Empty match: step over one character; it ends up in a gap.
          offset = ms + 1;
          while (offset < len && (static_cast<uint8_t>(text[frag.first + offset]) & 0xC0) == 0x80) ++offset;
          continue;
        }
        if (ms > emitted) next.emplace_back(frag.first + emitted, frag.first + ms);
        next.emplace_back(frag.first + ms, frag.first + me);
        emitted = offset = me;
      }
      if (!status.ok()) break;
      if (emitted < len) next.emplace_back(frag.first + emitted, frag.second);
    }
    pcre2_match_data_free(md);
    if (!status.ok()) break;
    std::swap(cur, next);
  }
  pcre2_jit_stack_free(jit_stack);
  pcre2_match_context_free(mctx);
  if (!status.ok()) return status;
  words->reserve(words->size() + cur.size());
  for (const Span& s : cur) words->push_back(text.substr(s.first, s.second - s.first));
  return absl::OkStatus();
}

}  // namespace nibble
