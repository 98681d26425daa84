// NOTE: no Abseil header may be included here (see sp_reference.h).
#include "tests/spm/sp_reference.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

namespace nibble::testing {

struct SpReference::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SpReference::SpReference(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SpReference::~SpReference() = default;

std::unique_ptr<SpReference> SpReference::Load(const std::string& path, std::string* error) {
  auto impl = std::make_unique<Impl>();
  const auto s = impl->sp.Load(path);
  if (!s.ok()) {
    *error = s.ToString();
    return nullptr;
  }
  return std::unique_ptr<SpReference>(new SpReference(std::move(impl)));
}

std::unique_ptr<SpReference> SpReference::FromBytes(const std::string& bytes, std::string* error) {
  auto impl = std::make_unique<Impl>();
  const auto s = impl->sp.LoadFromSerializedProto(bytes);
  if (!s.ok()) {
    *error = s.ToString();
    return nullptr;
  }
  return std::unique_ptr<SpReference>(new SpReference(std::move(impl)));
}

std::vector<int> SpReference::Encode(std::string_view text) const {
  std::vector<int> ids;
  if (!impl_->sp.Encode(text, &ids).ok()) ids.clear();
  return ids;
}

int SpReference::size() const { return impl_->sp.GetPieceSize(); }
std::string SpReference::Piece(int id) const { return impl_->sp.IdToPiece(id); }
float SpReference::Score(int id) const { return impl_->sp.GetScore(id); }
bool SpReference::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SpReference::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
bool SpReference::IsUnused(int id) const { return impl_->sp.IsUnused(id); }
bool SpReference::IsByte(int id) const { return impl_->sp.IsByte(id); }
int SpReference::PieceToId(std::string_view piece) const { return impl_->sp.PieceToId(piece); }
int SpReference::bos_id() const { return impl_->sp.bos_id(); }
int SpReference::eos_id() const { return impl_->sp.eos_id(); }
int SpReference::unk_id() const { return impl_->sp.unk_id(); }
int SpReference::pad_id() const { return impl_->sp.pad_id(); }

bool TrainSentencePiece(const std::string& args, std::string* error) {
  const auto s = sentencepiece::SentencePieceTrainer::Train(args);
  if (!s.ok()) {
    *error = s.ToString();
    return false;
  }
  return true;
}

}  // namespace nibble::testing
