// NOTE: no Abseil header may be included here (see sp_processor.h).
#include "engine/tokenizer/sp_processor.h"

#include <sentencepiece_processor.h>

namespace nibble::internal {

struct SpProcessor::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SpProcessor::SpProcessor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SpProcessor::~SpProcessor() = default;

std::unique_ptr<SpProcessor> SpProcessor::Load(const std::string& path, std::string* error) {
  auto impl = std::make_unique<Impl>();
  const sentencepiece::util::Status s = impl->sp.Load(path);
  if (!s.ok()) {
    *error = s.ToString();
    return nullptr;
  }
  if (impl->sp.GetPieceSize() <= 0) {
    *error = "the model has no pieces";
    return nullptr;
  }
  return std::unique_ptr<SpProcessor>(new SpProcessor(std::move(impl)));
}

std::unique_ptr<SpProcessor> SpProcessor::LoadFromBytes(const std::string& bytes, std::string* error) {
  auto impl = std::make_unique<Impl>();
  const sentencepiece::util::Status s = impl->sp.LoadFromSerializedProto(bytes);
  if (!s.ok()) {
    *error = s.ToString();
    return nullptr;
  }
  if (impl->sp.GetPieceSize() <= 0) {
    *error = "the model has no pieces";
    return nullptr;
  }
  return std::unique_ptr<SpProcessor>(new SpProcessor(std::move(impl)));
}

std::string SpProcessor::Serialized() const { return impl_->sp.serialized_model_proto(); }

bool SpProcessor::Encode(std::string_view text, std::vector<int>* ids, std::string* error) const {
  const sentencepiece::util::Status s = impl_->sp.Encode(text, ids);
  if (!s.ok()) {
    *error = s.ToString();
    return false;
  }
  return true;
}

int SpProcessor::size() const { return impl_->sp.GetPieceSize(); }
const std::string& SpProcessor::Piece(int id) const { return impl_->sp.IdToPiece(id); }
float SpProcessor::Score(int id) const { return impl_->sp.GetScore(id); }
bool SpProcessor::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SpProcessor::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
bool SpProcessor::IsUnused(int id) const { return impl_->sp.IsUnused(id); }
bool SpProcessor::IsByte(int id) const { return impl_->sp.IsByte(id); }

int SpProcessor::PieceToId(std::string_view piece) const {
  const int id = impl_->sp.PieceToId(piece);  // returns unk_id for unknown pieces
  if (id < 0 || id >= size() || impl_->sp.IdToPiece(id) != piece) return -1;
  return id;
}

int SpProcessor::bos_id() const { return impl_->sp.bos_id(); }
int SpProcessor::eos_id() const { return impl_->sp.eos_id(); }
int SpProcessor::unk_id() const { return impl_->sp.unk_id(); }
int SpProcessor::pad_id() const { return impl_->sp.pad_id(); }

}  // namespace nibble::internal
