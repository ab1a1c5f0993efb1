// Turns every ```cpp block of README.md and docs/ into C++ that the build compiles, so that a
// snippet that no longer matches the API breaks the build (and CI) instead of misleading a
// reader. Torch-free and std-only: it builds in a second, before the snippets.
//
// Usage: hive_doc_snippets <source_dir> <out_dir> <file.md>...
//
// Each snippet gets a namespace of its own. Its #include lines go to the top of the file; the
// declarations it opens with (struct, class, template, using, constexpr, TORCH_MODULE,
// static_assert, int main) stay at namespace scope; everything from its first statement on
// becomes the body of a function. Names a fragment uses without declaring (x, model, sgd,
// dht, …) come from tests/docs/context.hpp. #line directives make a compile error name the
// Markdown file and line. Writes <out_dir>/snippets.cpp, one translation unit (each costs
// ~15 s of libtorch headers), and prints how many snippets of how many files it holds. Fails
// on an unterminated block, and when it finds no snippet at all.
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct Line {
  std::string text;
  int number;  // in the Markdown file
};

struct Snippet {
  std::string file;  // relative to the source directory
  std::vector<Line> includes, declarations, body;
};

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// The line without its // comment, and the change in bracket depth it makes (string and
// character literals skipped).
std::pair<std::string_view, int> code_of(std::string_view line) {
  int depth = 0;
  char quote = 0;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quote) {
      if (c == '\\') ++i;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '"' || c == '\'') {
      // A digit separator (64'000) is not a quote.
      if (c == '\'' && i > 0 && std::isdigit(static_cast<unsigned char>(line[i - 1]))) continue;
      quote = c;
    } else if (c == '/' && i + 1 < line.size() && line[i + 1] == '/') {
      return {trim(line.substr(0, i)), depth};
    } else if (c == '{' || c == '(' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ')' || c == ']') {
      --depth;
    }
  }
  return {trim(line), depth};
}

bool starts_declaration(std::string_view code) {
  for (std::string_view word : {"struct ", "class ", "template", "TORCH_MODULE", "constexpr ", "using ", "namespace ",
                                "int main(", "static_assert", "inline ", "enum "})
    if (code.starts_with(word)) return true;
  return false;
}

Snippet parse(const std::string& file, const std::vector<Line>& lines) {
  Snippet s;
  s.file = file;
  bool in_body = false, open = false;
  int depth = 0;
  for (const auto& line : lines) {
    auto [code, change] = code_of(line.text);
    if (depth == 0 && !open && code.starts_with("#include")) {
      s.includes.push_back(line);
      continue;
    }
    if (depth == 0 && !open && !code.empty() && !in_body && !starts_declaration(code)) in_body = true;
    Line out = line;
    if (auto at = out.text.find("int main("); at != std::string::npos) {
      out.text.replace(at, 9, "int snippet_main(");
    }
    (in_body ? s.body : s.declarations).push_back(std::move(out));
    depth += change;
    if (!code.empty()) open = depth > 0 || !(code.ends_with(';') || code.ends_with('}'));
  }
  return s;
}

void emit_lines(std::ostream& out, const Snippet& s, const std::vector<Line>& lines) {
  int next = -1;
  for (const auto& l : lines) {
    if (l.number != next) out << "#line " << l.number << " \"" << s.file << "\"\n";
    out << l.text << "\n";
    next = l.number + 1;
  }
}

void emit(std::ostream& out, const Snippet& s, int index) {
  out << "\nnamespace hive_snippet_" << index << " {  // " << s.file << ":"
      << (s.includes.empty() ? (s.declarations.empty() ? s.body.front().number : s.declarations.front().number)
                             : s.includes.front().number)
      << "\n";
  out << "using namespace hive_docs;\nHIVE_DOCS_NAMES\n";
  emit_lines(out, s, s.declarations);
  if (!s.body.empty()) {
    out << "[[maybe_unused]] void body() {\n";
    emit_lines(out, s, s.body);
    out << "}\n";
  }
  out << "}  // namespace hive_snippet_" << index << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: hive_doc_snippets <source_dir> <out_dir> <file.md>...\n";
    return 2;
  }
  const std::filesystem::path source_dir = argv[1], out_dir = argv[2];
  std::vector<Snippet> snippets;
  std::set<std::string> files_with_snippets;
  for (int a = 3; a < argc; ++a) {
    const std::filesystem::path path = argv[a];
    const auto file = std::filesystem::relative(path, source_dir).generic_string();
    std::ifstream in(path);
    if (!in) {
      std::cerr << "hive_doc_snippets: cannot read " << path << "\n";
      return 1;
    }
    std::string text;
    std::vector<Line> block;
    bool inside = false;
    int number = 0, opened = 0;
    while (std::getline(in, text)) {
      ++number;
      const auto t = trim(text);
      if (!inside && t == "```cpp") {
        inside = true;
        opened = number;
        block.clear();
      } else if (inside && t == "```") {
        inside = false;
        if (!block.empty()) {
          snippets.push_back(parse(file, block));
          files_with_snippets.insert(file);
        }
      } else if (inside) {
        block.push_back({text, number});
      }
    }
    if (inside) {
      std::cerr << file << ":" << opened << ": a ```cpp block that never ends\n";
      return 1;
    }
  }

  std::ostringstream out;
  out << "// Generated by tests/docs/extract_snippets.cpp from README.md and docs/: do not edit.\n";
  std::set<std::string> seen;
  for (const auto& s : snippets)
    for (const auto& i : s.includes)
      if (seen.insert(std::string(code_of(i.text).first)).second) out << code_of(i.text).first << "\n";
  out << "#include \"context.hpp\"\n";
  int index = 0;
  for (const auto& s : snippets) emit(out, s, ++index);
  // Rewritten only on change, so that a docs edit outside the snippets recompiles nothing.
  std::filesystem::create_directories(out_dir);
  const auto path = out_dir / "snippets.cpp";
  std::ifstream old(path);
  const std::string previous((std::istreambuf_iterator<char>(old)), std::istreambuf_iterator<char>());
  old.close();
  if (previous != out.str()) std::ofstream(path) << out.str();
  std::printf("%zu C++ snippets from %zu files of README.md and docs/\n", snippets.size(), files_with_snippets.size());
  return snippets.empty() ? 1 : 0;
}
