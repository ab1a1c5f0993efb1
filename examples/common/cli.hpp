#pragma once
// Small helpers shared by the command-line programs (torch-free: hive-dht includes it too).

#include <hive/core/error.hpp>

#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace hive::examples {

/// "a,b,,c" → {"a", "b", "c"}.
inline std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');)
    if (!part.empty()) out.push_back(part);
  return out;
}

/// A command-line flag in its canonical spelling: "--initial-peers" (hivemind's newer
/// spelling) becomes "--initial_peers"; anything else is returned unchanged.
inline std::string flag_name(std::string flag) {
  if (flag.size() > 2 && flag.starts_with("--"))
    for (std::size_t i = 2; i < flag.size(); ++i)
      if (flag[i] == '-') flag[i] = '_';
  return flag;
}

/// `text` as a T (an integer or a floating-point type); throws hive::InvalidArgument naming
/// `flag` unless all of it is one.
template <class T>
T parse_number(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  T v{};
  try {
    if constexpr (std::is_integral_v<T>) v = static_cast<T>(std::stoll(text, &used));
    else v = static_cast<T>(std::stod(text, &used));
  } catch (const std::exception&) {
    used = 0;
  }
  HIVE_CHECK(used == text.size() && !text.empty(), "{} takes {}, got '{}'", flag,
             std::is_integral_v<T> ? "an integer" : "a number", text);
  return v;
}

/// The whole text of `path` (a --config file); throws hive::InvalidArgument when unreadable.
inline std::string read_text_file(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw InvalidArgument("cannot read " + path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

}  // namespace hive::examples
