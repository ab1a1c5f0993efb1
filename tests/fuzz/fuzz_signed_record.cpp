// Fuzzes record validation (hive/dht/validation.hpp) as a storing peer and a reader run it on
// what others send: the signature wrapper, owner markers in keys and subkeys, and schemas.
//
// Input: one byte choosing the mode, then:
//   mode 0 (check):  a subkey (none, an integer, or a string with up to two owner markers of
//                    fixed identities, some malformed), a raw key choice and a value; the value
//                    is checked, stripped and compared against the held value as a storing
//                    peer does. A record the check accepts under an owner must unwrap, and its
//                    signature must be that owner's.
//   mode 1 (forge):  one of 16 values signed by the fixed owner, then the input's edits to its
//                    bytes, its expiration or its subkey: the check accepts exactly the unedited
//                    record (or a re-spelling of the same signed content).
//   mode 2 (schema): MessagePack checked by a SchemaValidator with typed fields, under one of
//                    three keys, as a regular value or a subkey entry.

#include "fuzz_common.hpp"

#include <hive/dht/validation.hpp>

#include <map>

namespace {

using namespace hive;
using namespace hive::dht;

const Identity& owner() { return fuzz::fixed_identity(1); }
const Identity& other() { return fuzz::fixed_identity(2); }

const std::shared_ptr<const Identity>& owner_ptr() {
  static const auto p = std::make_shared<const Identity>(owner());
  return p;
}

// A subkey from the input: none, an integer, or text around owner markers.
std::optional<Subkey> take_subkey(fuzz::Input& in) {
  switch (in.u8() % 4) {
    case 0: return std::nullopt;
    case 1: return Subkey(in.take<std::int64_t>());
    default: {
      std::string s;
      const int parts = in.u8() % 4;
      for (int i = 0; i < parts; ++i) {
        switch (in.u8() % 5) {
          case 0: s += owner().owner_marker(); break;
          case 1: s += other().owner_marker(); break;
          case 2: s += "[owner:" + owner().peer_id().substr(0, in.u8() % 43); break;  // cut short
          case 3: s += "[owner:]"; break;
          default: {
            const auto b = in.chunk();
            s.append(b.begin(), b.end());
          }
        }
      }
      return Subkey(std::move(s));
    }
  }
}

void check(fuzz::Input& in) {
  const auto subkey = take_subkey(in);
  const int key_choice = in.u8() % 3;
  const std::string raw_key = key_choice == 0 ? std::string() : key_choice == 1 ? "weights" + owner().owner_marker() : "plain";
  const Id160 key = Id160::of(raw_key.empty() ? "stored by id" : raw_key);
  const double expiration = in.take<double>();
  const auto value = in.rest();
  const SignatureValidator checker;
  const RecordView view{key, raw_key, subkey ? &*subkey : nullptr, value, expiration};
  const bool valid = checker.validate(view);
  const auto owner_id = SignatureValidator::owner_of(view);
  const auto stripped = checker.strip(view);
  if (valid && owner_id && !owner_id->empty()) {
    const auto wrapped = SignatureValidator::unwrap(value);
    HIVE_FUZZ_EXPECT(wrapped.has_value(), "an owned record passed without a wrapper");
    HIVE_FUZZ_EXPECT(stripped == wrapped->value, "strip did not return the signed value");
    const auto pk = public_key_of(*owner_id);
    HIVE_FUZZ_EXPECT(pk && verify_signature(*pk, SignatureValidator::signed_bytes(key, view.subkey, expiration, wrapped->value),
                                            wrapped->signature),
                     "an owned record passed with a signature that is not its owner's");
  }
  if (!owner_id) HIVE_FUZZ_EXPECT(!valid, "a malformed owner claim passed");
  // As a storing peer: may this replace a value the owner signed? Only under the owner's own
  // marker is there one to replace (signatures are cached: signing is libsodium's cost, not
  // what is fuzzed here).
  if (owner_id && *owner_id == owner().peer_id()) {
    static std::map<std::pair<std::string, std::optional<Subkey>>, dht::Bytes> held_values;
    if (held_values.size() > 4096) held_values.clear();
    auto [it, fresh] = held_values.try_emplace({raw_key, subkey});
    if (fresh) {
      const SignatureValidator signer(owner_ptr());
      const dht::Bytes honest_value{0xa1, 0x78};
      it->second = signer.sign(RecordView{key, raw_key, view.subkey, honest_value, 1e9});
    }
    const RecordView held{key, {}, view.subkey, it->second, 1e9};
    const bool replaces = checker.may_replace(held, view);
    if (replaces && valid) HIVE_FUZZ_EXPECT(SignatureValidator::owner_of(view) == owner_id, "another owner's value replaced the owner's");
  }
  Validators chain;
  chain.add(std::make_shared<SignatureValidator>());
  HIVE_FUZZ_EXPECT(chain.validate(view) == valid, "a chain of one disagrees with its validator");
}

void forge(fuzz::Input& in) {
  const SignatureValidator signer(owner_ptr());
  const SignatureValidator checker;
  const Subkey subkey = owner().owner_marker();
  const Id160 key = Id160::of("progress");
  // 16 values signed once (signing is libsodium's cost; the wrapper and its check are fuzzed).
  static const auto signed_values = [&] {
    std::vector<std::pair<dht::Bytes, double>> out;
    for (int i = 0; i < 16; ++i) {
      const auto value = nlohmann::json::to_msgpack({{"step", i}, {"blob", std::string(static_cast<std::size_t>(i * 7), 'x')}});
      const double when = 1e9 + i;
      out.emplace_back(signer.sign(RecordView{key, {}, &subkey, value, when}), when);
    }
    return out;
  }();
  auto [stored, expiration] = signed_values[in.below(signed_values.size())];
  const auto original = stored;
  double when = expiration;
  Subkey where = subkey;
  const int edits = in.u8() % 4;
  for (int i = 0; i < edits && !in.empty(); ++i) {
    switch (in.u8() % 4) {
      case 0: stored[in.below(stored.size())] ^= static_cast<std::uint8_t>(in.u8() | 1); break;
      case 1: when += 1 + in.u8(); break;
      case 2: where = Subkey(std::get<std::string>(where) + "x"); break;
      default: stored.resize(in.below(stored.size())); break;
    }
  }
  const bool edited = stored != original || when != expiration || where != subkey;
  const bool valid = checker.validate(RecordView{key, {}, &where, stored, when});
  if (edited && valid) {
    // An edit the check cannot see must leave the signed content as it was (a MessagePack
    // re-spelling of the same map, say).
    const auto a = SignatureValidator::unwrap(stored), b = SignatureValidator::unwrap(original);
    HIVE_FUZZ_EXPECT(a && b && a->value == b->value && a->signature == b->signature && when == expiration && where == subkey,
                     "an edited signed record passed its check");
  }
  if (!edited) HIVE_FUZZ_EXPECT(valid, "an unedited record failed");
}

void schema(fuzz::Input& in) {
  static const auto validator = [] {
    auto v = std::make_shared<SchemaValidator>();
    v->field("peers", {ValueType::object, {{"addr", ValueType::string}, {"port", ValueType::integer}}, true, true});
    v->field("epoch", {ValueType::integer, {}, false, std::nullopt});
    v->allow_extra_keys(false);
    return v;
  }();
  static const std::array<std::string, 3> keys{"peers", "epoch", "unknown"};
  const Id160 key = Id160::of(keys[in.below(keys.size())]);
  const auto subkey = take_subkey(in);
  const auto value = in.rest();
  (void)validator->validate(RecordView{key, {}, subkey ? &*subkey : nullptr, value, 1e9});
}

std::vector<fuzz::Seed> seeds() {
  std::vector<fuzz::Seed> out;
  const SignatureValidator signer(owner_ptr());
  const Subkey subkey = owner().owner_marker();
  const Id160 key = Id160::of("stored by id");
  const auto value = nlohmann::json::to_msgpack({{"step", 10}});
  // mode 0: an owner's signed value under its marker (subkey: string of one part, its marker).
  const double expiration = 1e9;
  const auto signed_value = signer.sign(RecordView{key, {}, &subkey, value, expiration});
  out.push_back({"check_signed", fuzz::join({std::vector<std::uint8_t>{0, 2, 1, 0, 0}, fuzz::le(expiration), signed_value})});
  out.push_back({"check_plain", fuzz::join({std::vector<std::uint8_t>{0, 0, 2}, fuzz::le(expiration), value})});
  out.push_back({"forge_flip", std::vector<std::uint8_t>{1, 3, 1, 0, 9, 0x40}});
  out.push_back({"schema_peers", fuzz::join({std::vector<std::uint8_t>{2, 0, 2, 1, 4, 1, 'x'},
                                             nlohmann::json::to_msgpack({{"addr", "10.0.0.1"}, {"port", 5000}})})});
  out.push_back({"schema_epoch", fuzz::join({std::vector<std::uint8_t>{2, 1, 0}, nlohmann::json::to_msgpack(3)})});
  return out;
}

void one_input(hive::fuzz::Input& in) {
  switch (in.u8() % 3) {
    case 0: check(in); break;
    case 1: forge(in); break;
    default: schema(in); break;
  }
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
