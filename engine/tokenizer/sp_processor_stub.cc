// internal::SpProcessor without SentencePiece (library nibble_sp_stub), for
// processes that must not load libsentencepiece: Debian's build bundles its own
// protobuf, which crashes in a process that also links gRPC (nibble-server).
// Every Load fails with a clear message, so no SpProcessor object ever exists
// and the accessors below are unreachable.
#include <string>

#include "engine/tokenizer/sp_processor.h"

namespace nibble::internal {

namespace {
constexpr const char* kUnsupported =
    "SentencePiece .model tokenizers are not supported in nibble-server (it links gRPC, which "
    "conflicts with libsentencepiece's bundled protobuf); use a GGUF model with an embedded "
    "vocabulary, a llama2.c tok*.bin tokenizer, or nibble-generate";
}  // namespace

struct SpProcessor::Impl {};

SpProcessor::SpProcessor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SpProcessor::~SpProcessor() = default;

std::unique_ptr<SpProcessor> SpProcessor::Load(const std::string& path, std::string* error) {
  if (error != nullptr) *error = kUnsupported;
  return nullptr;
}

std::unique_ptr<SpProcessor> SpProcessor::LoadFromBytes(const std::string& bytes, std::string* error) {
  if (error != nullptr) *error = kUnsupported;
  return nullptr;
}

std::string SpProcessor::Serialized() const { return {}; }
bool SpProcessor::Encode(std::string_view text, std::vector<int>* ids, std::string* error) const {
  if (error != nullptr) *error = kUnsupported;
  return false;
}
int SpProcessor::size() const { return 0; }
const std::string& SpProcessor::Piece(int id) const {
  static const std::string kEmpty;
  return kEmpty;
}
float SpProcessor::Score(int id) const { return 0.0f; }
bool SpProcessor::IsControl(int id) const { return false; }
bool SpProcessor::IsUnknown(int id) const { return false; }
bool SpProcessor::IsUnused(int id) const { return false; }
bool SpProcessor::IsByte(int id) const { return false; }
int SpProcessor::PieceToId(std::string_view piece) const { return -1; }
int SpProcessor::bos_id() const { return -1; }
int SpProcessor::eos_id() const { return -1; }
int SpProcessor::unk_id() const { return -1; }
int SpProcessor::pad_id() const { return -1; }

}  // namespace nibble::internal
