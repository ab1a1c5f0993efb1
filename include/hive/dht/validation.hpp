#pragma once
/// @file
/// Record validation: what a DHT peer accepts at store time and returns at read time. A chain
/// of RecordValidator objects signs what this peer writes, checks what anyone writes, and
/// strips signatures from what a reader gets. SignatureValidator (always on in dht::Node) makes
/// keys and subkeys that name an owner (`[owner:<peer id>]`, as hivemind's
/// RSASignatureValidator) accept only values their owner signed; SchemaValidator types the
/// values of known keys (as hivemind's SchemaValidator).

#include <hive/core/identity.hpp>
#include <hive/core/id.hpp>
#include <hive/core/msgpack.hpp>
#include <hive/dht/storage.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <bit>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace hive::dht {

/// A record as validators see it: one value (or one dictionary entry) with its place.
struct RecordView {
  /// The key's id (what storing peers see).
  Id160 key;
  /// The key as its writer or reader named it; empty where only the id is known (a peer that
  /// stores for others).
  std::string_view raw_key;
  /// The subkey of a dictionary entry; nullptr for a regular value.
  const Subkey* subkey = nullptr;
  /// The value's bytes as stored (MessagePack; signed ones wrapped, see SignatureValidator).
  std::span<const std::uint8_t> value;
  /// Absolute expiration.
  double expiration = 0;
};

/// One rule on records. Validators form a chain (Validators): sign() runs from the first to
/// the last, validate() and strip() from the last to the first, each seeing what the outer
/// ones stripped, so a signature added last is checked first.
class RecordValidator {
 public:
  virtual ~RecordValidator() = default;
  /// Whether the record may be stored, and returned to readers.
  [[nodiscard]] virtual bool validate(const RecordView& record) const = 0;
  /// The bytes this peer stores for a record it writes (signed, say); by default unchanged.
  [[nodiscard]] virtual Bytes sign(const RecordView& record) const { return {record.value.begin(), record.value.end()}; }
  /// The bytes inner validators and readers see; by default unchanged.
  [[nodiscard]] virtual Bytes strip(const RecordView& record) const { return {record.value.begin(), record.value.end()}; }
  /// Whether `incoming` (already valid) may replace `held` at a storing peer; by default yes.
  [[nodiscard]] virtual bool may_replace(const RecordView& held, const RecordView& incoming) const {
    (void)held;
    (void)incoming;
    return true;
  }
};

/// A chain of validators, applied as RecordValidator describes. Cheap to copy (shared).
class Validators {
 public:
  /// Appends `v` as the outermost so far.
  void add(std::shared_ptr<const RecordValidator> v) {
    HIVE_CHECK(v != nullptr, "a validator must not be null");
    chain_.push_back(std::move(v));
  }
  /// Number of validators.
  [[nodiscard]] std::size_t size() const noexcept { return chain_.size(); }

  /// Every validator accepts the record (outermost first, each on what the outer stripped).
  [[nodiscard]] bool validate(RecordView record) const {
    Bytes stripped;
    for (auto it = chain_.rbegin(); it != chain_.rend(); ++it) {
      if (!(*it)->validate(record)) return false;
      if (std::next(it) == chain_.rend()) break;
      stripped = (*it)->strip(record);
      record.value = stripped;
    }
    return true;
  }
  /// The bytes to store for a record this peer writes.
  [[nodiscard]] Bytes sign(RecordView record) const {
    Bytes out(record.value.begin(), record.value.end());
    for (const auto& v : chain_) {
      record.value = out;
      out = v->sign(record);
    }
    return out;
  }
  /// The bytes a reader gets from a stored value.
  [[nodiscard]] Bytes strip(RecordView record) const {
    Bytes out(record.value.begin(), record.value.end());
    for (auto it = chain_.rbegin(); it != chain_.rend(); ++it) {
      record.value = out;
      out = (*it)->strip(record);
    }
    return out;
  }
  /// Every validator lets `incoming` replace `held`.
  [[nodiscard]] bool may_replace(const RecordView& held, const RecordView& incoming) const {
    for (const auto& v : chain_)
      if (!v->may_replace(held, incoming)) return false;
    return true;
  }

 private:
  std::vector<std::shared_ptr<const RecordValidator>> chain_;
};

/// Keys and subkeys that name an owner accept only values the owner signed.
///
/// An owner is named by `[owner:<peer id>]` anywhere in a key or a string subkey (at most one
/// marker per record). The owner's value is stored as the MessagePack map
/// `{"hive.signed": <value bytes>, "sig": <Ed25519 signature>}` (plus `"key": <key>` when the
/// marker is in the key, since storing peers see only its id). The signature covers a label,
/// the key's id, the subkey, the expiration and the value, so a signed value cannot be moved
/// to another key or subkey or kept past its expiration.
///
/// Storing peers check subkey owners fully. A key owner is known to them from the wrapped
/// `"key"`: once they hold a value signed for a key, only the same owner's signed values
/// replace it. Readers, who know the key, check both.
class SignatureValidator : public RecordValidator {
 public:
  /// A validator that signs the records that name `identity` as their owner (none when
  /// null: such a peer only checks).
  explicit SignatureValidator(std::shared_ptr<const Identity> identity = nullptr) : identity_(std::move(identity)) {}

  /// The peer id named by the owner marker in `text`, "" when there is none, nullopt when
  /// there is more than one or it is malformed.
  static std::optional<std::string> owner_in(std::string_view text) {
    static constexpr std::string_view open = "[owner:";
    const auto at = text.find(open);
    if (at == std::string_view::npos) return std::string();
    const auto close = text.find(']', at);
    if (close == std::string_view::npos) return std::nullopt;
    const auto id = text.substr(at + open.size(), close - at - open.size());
    if (text.find(open, close) != std::string_view::npos || !public_key_of(id)) return std::nullopt;
    return std::string(id);
  }

  /// The bytes a record's signature covers.
  static std::vector<std::uint8_t> signed_bytes(const Id160& key, const Subkey* subkey, double expiration,
                                                std::span<const std::uint8_t> value) {
    static constexpr std::string_view label = "hive-record-v1";
    std::vector<std::uint8_t> out(label.begin(), label.end());
    out.insert(out.end(), key.bytes().begin(), key.bytes().end());
    auto put = [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    };
    if (!subkey) {
      out.push_back(0);
    } else if (const auto* i = std::get_if<std::int64_t>(subkey)) {
      out.push_back(1);
      put(i, sizeof *i);
    } else {
      const auto& s = std::get<std::string>(*subkey);
      const auto n = static_cast<std::uint64_t>(s.size());
      out.push_back(2);
      put(&n, sizeof n);
      put(s.data(), s.size());
    }
    const auto bits = std::bit_cast<std::uint64_t>(expiration);
    put(&bits, sizeof bits);
    put(value.data(), value.size());
    return out;
  }

  /// A record's signed form, as the wrapper.
  struct Signed {
    /// The value that was signed.
    Bytes value;
    /// The signature.
    Signature signature{};
    /// The key, when the wrapper carries it.
    std::optional<std::string> key;
  };

  /// The wrapper in `bytes`, or nullopt when they are not one.
  static std::optional<Signed> unwrap(std::span<const std::uint8_t> bytes) {
    // A fixmap of 2 or 3 entries; anything else is a plain value.
    if (bytes.empty() || (bytes[0] != 0x82 && bytes[0] != 0x83)) return std::nullopt;
    nlohmann::json j;
    try {
      j = parse_msgpack(bytes, 4);
    } catch (const Error&) {
      return std::nullopt;
    }
    if (!j.is_object() || !j.contains(wrapper_field) || !j[wrapper_field].is_binary() || !j.contains("sig") ||
        !j["sig"].is_binary() || j["sig"].get_binary().size() != std::tuple_size_v<Signature>)
      return std::nullopt;
    Signed s;
    s.value = j[wrapper_field].get_binary();
    std::copy_n(j["sig"].get_binary().begin(), s.signature.size(), s.signature.begin());
    if (j.contains("key")) {
      if (!j["key"].is_string()) return std::nullopt;
      s.key = j["key"].get<std::string>();
    }
    if (j.size() != (s.key ? 3u : 2u)) return std::nullopt;
    return s;
  }

  /// The owner a record names: from its subkey, its raw key, or the key its wrapper carries
  /// (checked against the id). "" for an unowned record, nullopt for a malformed claim.
  static std::optional<std::string> owner_of(const RecordView& r) { return owner_of(r, unwrap(r.value)); }

  /// owner_of(r), given the record's wrapper as unwrap(r.value) returned it.
  static std::optional<std::string> owner_of(const RecordView& r, const std::optional<Signed>& wrapped) {
    std::string owner;
    auto take = [&](std::string_view text) -> bool {
      auto found = owner_in(text);
      if (!found) return false;
      if (found->empty()) return true;
      if (!owner.empty()) return false;  // two markers
      owner = *found;
      return true;
    };
    if (r.subkey && std::holds_alternative<std::string>(*r.subkey) && !take(std::get<std::string>(*r.subkey))) return std::nullopt;
    if (!r.raw_key.empty()) {
      if (!take(r.raw_key)) return std::nullopt;
    } else if (wrapped && wrapped->key) {
      if (Id160::of(*wrapped->key) != r.key || !take(*wrapped->key)) return std::nullopt;
    }
    return owner;
  }

  /// An owned record is valid when its wrapper's signature is the owner's; an unowned one
  /// always (it may still be a wrapper, whose signature is then checked too).
  /// A signature checked once is remembered (the last verified_cache_entries of them), so
  /// the same record arriving from several replicas, or stored again, is checked once.
  [[nodiscard]] bool validate(const RecordView& r) const override {
    const auto wrapped = unwrap(r.value);
    const auto owner = owner_of(r, wrapped);
    if (!owner) return false;
    if (owner->empty()) return true;
    if (!wrapped) return false;
    if (wrapped->key && Id160::of(*wrapped->key) != r.key) return false;
    const auto key = public_key_of(*owner);
    return key && verify_remembered(*key, signed_bytes(r.key, r.subkey, r.expiration, wrapped->value), wrapped->signature);
  }

  /// How many verified signatures a validator remembers.
  static constexpr std::size_t verified_cache_entries = 8192;

  /// Wraps and signs a record whose owner is this validator's identity; others unchanged.
  [[nodiscard]] Bytes sign(const RecordView& r) const override {
    const auto owner = owner_of(r);
    if (!identity_ || !owner || owner->empty() || *owner != identity_->peer_id()) return {r.value.begin(), r.value.end()};
    nlohmann::json j{{wrapper_field, nlohmann::json::binary(Bytes(r.value.begin(), r.value.end()))}};
    const Signature signature = identity_->sign(signed_bytes(r.key, r.subkey, r.expiration, r.value));
    j["sig"] = nlohmann::json::binary(std::vector<std::uint8_t>(signature.begin(), signature.end()));
    const bool marker_in_key = !r.raw_key.empty() && !owner_in(r.raw_key).value_or("").empty();
    if (marker_in_key) j["key"] = std::string(r.raw_key);
    return nlohmann::json::to_msgpack(j);
  }

  /// The signed value without its wrapper.
  [[nodiscard]] Bytes strip(const RecordView& r) const override {
    if (auto wrapped = unwrap(r.value)) return std::move(wrapped->value);
    return {r.value.begin(), r.value.end()};
  }

  /// An owned value is replaced only by its owner's.
  [[nodiscard]] bool may_replace(const RecordView& held, const RecordView& incoming) const override {
    const auto held_owner = owner_of(held);
    if (!held_owner || held_owner->empty()) return true;
    return owner_of(incoming) == held_owner;
  }

  /// The wrapper's field that holds the signed value.
  static constexpr const char* wrapper_field = "hive.signed";

 private:
  using Digest = std::array<std::uint8_t, 16>;
  struct DigestHash {
    std::size_t operator()(const Digest& d) const noexcept {
      std::size_t h = 0;
      std::memcpy(&h, d.data(), sizeof h);
      return h;
    }
  };

  // verify_signature, remembering successes by a digest of everything checked.
  bool verify_remembered(const PublicKey& key, std::span<const std::uint8_t> message, const Signature& signature) const {
    Digest digest{};
    crypto_generichash_state state;
    crypto_generichash_init(&state, nullptr, 0, digest.size());
    crypto_generichash_update(&state, key.data(), key.size());
    crypto_generichash_update(&state, signature.data(), signature.size());
    crypto_generichash_update(&state, message.data(), message.size());
    crypto_generichash_final(&state, digest.data(), digest.size());
    {
      std::lock_guard lock(verified_mutex_);
      if (verified_.contains(digest)) return true;
    }
    if (!verify_signature(key, message, signature)) return false;
    std::lock_guard lock(verified_mutex_);
    if (verified_.insert(digest).second) {
      verified_order_.push_back(digest);
      if (verified_order_.size() > verified_cache_entries) {
        verified_.erase(verified_order_.front());
        verified_order_.pop_front();
      }
    }
    return true;
  }

  std::shared_ptr<const Identity> identity_;
  mutable std::mutex verified_mutex_;
  mutable std::unordered_set<Digest, DigestHash> verified_;
  mutable std::deque<Digest> verified_order_;
};

/// Splits a subkey that starts with an owner marker ("[owner:<peer id>]rest", as hive's own
/// signed records write them: group announcements, expert records) into (peer id, rest); a
/// subkey without a marker in front gives ("", subkey). nullopt for a malformed marker, or a
/// marker anywhere else.
[[nodiscard]] inline std::optional<std::pair<std::string, std::string>> split_owned(std::string_view subkey) {
  static constexpr std::string_view open = "[owner:";
  if (!subkey.starts_with(open)) {
    if (subkey.find(open) != std::string_view::npos) return std::nullopt;
    return std::pair{std::string(), std::string(subkey)};
  }
  const auto close = subkey.find(']');
  if (close == std::string_view::npos) return std::nullopt;
  const auto peer = subkey.substr(open.size(), close - open.size());
  const auto rest = subkey.substr(close + 1);
  if (!public_key_of(peer) || rest.find(open) != std::string_view::npos) return std::nullopt;
  return std::pair{std::string(peer), std::string(rest)};
}

/// The JSON types a SchemaValidator field may require.
enum class ValueType { any, null, boolean, integer, number, string, binary, array, object };

/// Values of known keys must have the declared types (hivemind's SchemaValidator): a key's
/// value type, for a dictionary its subkey type, and for objects the types of named fields.
/// Keys are matched by id, so storing peers check them too. Keys not in the schema are
/// accepted unless allow_extra_keys(false).
class SchemaValidator : public RecordValidator {
 public:
  /// What one key holds.
  struct Field {
    /// The value's type.
    ValueType value = ValueType::any;
    /// For an object value, the types of fields it must have.
    std::map<std::string, ValueType> required;
    /// Whether the key holds a dictionary (true), a regular value (false), or either.
    std::optional<bool> dictionary;
    /// For a dictionary, whether subkeys are strings (true) or integers (false), or either.
    std::optional<bool> string_subkeys;
  };

  /// Declares `key`'s field; returns *this for chaining.
  SchemaValidator& field(std::string_view key, Field field) {
    fields_[Id160::of(key)] = std::move(field);
    return *this;
  }
  /// Whether keys not declared are accepted (default true).
  SchemaValidator& allow_extra_keys(bool allow) {
    allow_extra_ = allow;
    return *this;
  }

  /// True when `j` is of type `t`.
  static bool is(const nlohmann::json& j, ValueType t) {
    switch (t) {
      case ValueType::any: return true;
      case ValueType::null: return j.is_null();
      case ValueType::boolean: return j.is_boolean();
      case ValueType::integer: return j.is_number_integer();
      case ValueType::number: return j.is_number();
      case ValueType::string: return j.is_string();
      case ValueType::binary: return j.is_binary();
      case ValueType::array: return j.is_array();
      case ValueType::object: return j.is_object();
    }
    return false;
  }

  /// Checks the record against its key's field.
  [[nodiscard]] bool validate(const RecordView& r) const override {
    auto it = fields_.find(r.key);
    if (it == fields_.end()) return allow_extra_;
    const Field& f = it->second;
    if (f.dictionary && *f.dictionary != (r.subkey != nullptr)) return false;
    if (r.subkey && f.string_subkeys && *f.string_subkeys != std::holds_alternative<std::string>(*r.subkey)) return false;
    nlohmann::json j;
    try {
      j = parse_msgpack(r.value);
    } catch (const Error&) {
      return false;
    }
    if (!is(j, f.value)) return false;
    for (const auto& [name, type] : f.required)
      if (!j.is_object() || !j.contains(name) || !is(j[name], type)) return false;
    return true;
  }

 private:
  std::map<Id160, Field> fields_;
  bool allow_extra_ = true;
};

}  // namespace hive::dht
