#pragma once
// Small helpers shared by the command-line programs (torch-free: hive-dht includes it too).

#include <hive/core/error.hpp>

#include <fstream>
#include <sstream>
#include <string>
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

/// The whole text of `path` (a --config file); throws hive::InvalidArgument when unreadable.
inline std::string read_text_file(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw InvalidArgument("cannot read " + path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

}  // namespace hive::examples
