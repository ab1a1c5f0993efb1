#pragma once
/// @file
/// Fluent options structs in the style of libtorch (`Options().a(1).b(2)`) that also read from
/// and write to JSON, rejecting unknown keys so a typo in a config file is an error.

#include <hive/core/error.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <string>

/// Declares an option `name` of type `T` with a default: a fluent setter `name(value)`, a getter
/// `name()`, and the storage `name_`. Use inside a struct, then list the names in
/// HIVE_OPTIONS_JSON so the struct reads from and writes to JSON.
#define HIVE_ARG(T, name, ...)                                                  \
 public:                                                                        \
  /** Sets the `name` option and returns *this for chaining. */                 \
  auto name(const T& new_value) -> decltype(*this) {                            \
    this->name##_ = new_value;                                                  \
    return *this;                                                               \
  }                                                                             \
  /** The current value of the `name` option. */                                \
  [[nodiscard]] const T& name() const noexcept { return this->name##_; }        \
  /** Mutable access to the `name` option. */                                   \
  [[nodiscard]] T& name() noexcept { return this->name##_; }                    \
                                                                                \
 private:                                                                       \
  T name##_ = __VA_ARGS__

#define HIVE_DETAIL_OPT_TO(field) j[#field] = o.field();
#define HIVE_DETAIL_OPT_FROM(field)                                            \
  if (auto it = j.find(#field); it != j.end()) {                               \
    ::hive::detail::read_option(*it, o.field(), #field);                       \
    ++seen;                                                                    \
  }
#define HIVE_DETAIL_OPT_NAME(field) #field,

/// Defines `to_json`/`from_json` (as hidden friends) for an options struct over the listed
/// fields. `from_json` starts from the struct's defaults, overrides the keys present and throws
/// hive::InvalidArgument naming any key it does not know.
#define HIVE_OPTIONS_JSON(Type, ...)                                                           \
 public:                                                                                       \
  /** Writes every option to a JSON object. */                                                 \
  friend void to_json(nlohmann::json& j, const Type& o) {                                      \
    j = nlohmann::json::object();                                                              \
    NLOHMANN_JSON_EXPAND(NLOHMANN_JSON_PASTE(HIVE_DETAIL_OPT_TO, __VA_ARGS__))                 \
  }                                                                                            \
  /** Reads options from a JSON object; absent keys keep their defaults. */                    \
  friend void from_json(const nlohmann::json& j, Type& o) {                                    \
    HIVE_CHECK(j.is_object(), "{} must be a JSON object, got {}", #Type, j.type_name());       \
    std::size_t seen = 0;                                                                      \
    NLOHMANN_JSON_EXPAND(NLOHMANN_JSON_PASTE(HIVE_DETAIL_OPT_FROM, __VA_ARGS__))               \
    if (seen != j.size()) {                                                                    \
      static constexpr const char* known[] = {                                                 \
          NLOHMANN_JSON_EXPAND(NLOHMANN_JSON_PASTE(HIVE_DETAIL_OPT_NAME, __VA_ARGS__))};       \
      ::hive::detail::reject_unknown_keys(j, known, #Type);                                    \
    }                                                                                          \
  }                                                                                            \
  /** Reads options from JSON text, e.g. the contents of a config file. */                     \
  static Type from_json_text(std::string_view text) {                                          \
    return nlohmann::json::parse(text).get<Type>();                                            \
  }                                                                                            \
                                                                                               \
 private:

namespace hive {

/// Durations in options and JSON: seconds as a double.
using Seconds = std::chrono::duration<double>;

namespace detail {

template <class T>
void read_option(const nlohmann::json& value, T& out, const char* name) {
  try {
    out = value.get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(fmt::format("option '{}': {}", name, e.what()));
  }
}

template <std::size_t N>
[[noreturn]] void reject_unknown_keys(const nlohmann::json& j, const char* const (&known)[N],
                                      const char* type) {
  std::string names;
  for (const char* k : known) names += fmt::format("{}{}", names.empty() ? "" : ", ", k);
  for (const auto& [key, _] : j.items()) {
    bool found = false;
    for (const char* k : known) found = found || key == k;
    if (!found) throw InvalidArgument(fmt::format("{}: unknown option '{}' (known: {})", type, key, names));
  }
  throw InvalidArgument(fmt::format("{}: duplicate options", type));
}

}  // namespace detail
}  // namespace hive

namespace nlohmann {
/// Durations read from and written to JSON as a number of seconds.
template <class Rep, class Period>
struct adl_serializer<std::chrono::duration<Rep, Period>> {
  static void to_json(json& j, const std::chrono::duration<Rep, Period>& d) {
    j = std::chrono::duration<double>(d).count();
  }
  static void from_json(const json& j, std::chrono::duration<Rep, Period>& d) {
    if (!j.is_number()) throw json::type_error::create(302, "duration must be a number of seconds", &j);
    d = std::chrono::duration_cast<std::chrono::duration<Rep, Period>>(
        std::chrono::duration<double>(j.get<double>()));
  }
};
}  // namespace nlohmann
