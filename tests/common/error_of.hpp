#pragma once
// What a call that should fail said.

#include <exception>
#include <string>

namespace hive::test {

/// The message of the exception `f` throws, or "" when it throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace hive::test
