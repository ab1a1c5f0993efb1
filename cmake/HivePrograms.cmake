# Helpers for hive's own executables (tests, examples, benchmarks). Not installed: a consumer
# links hive::core or hive::hive and chooses its own flags.

# Headers behind the shared precompiled header of every torch target; pass
# -DHIVE_TORCH_PCH_HEADERS=<list> to try others, or empty to build without a PCH.
# Measured at -O2 -g on 2 cores: every TU pays to load the PCH whether it uses it or not
# (an empty TU: 7.3 s with <torch/torch.h> inside, 2.9 s with <ATen/ATen.h>), so it holds
# what most torch TUs include, not everything. With <ATen/ATen.h> the codec and RPC tensor
# tests took 21 s and 40 s instead of 31 s and 56 s; with <torch/torch.h> the torch tests
# built slower than with no PCH at all, and <torch/nn/module.h> added cost to these TUs
# without helping them. A TU that needs more still compiles; it parses the rest itself.
# Revisit when tests of moe/ or optim/ (torch::nn everywhere) outnumber these.
# Not a cache default, so that a change here reaches existing build trees.
if(NOT DEFINED HIVE_TORCH_PCH_HEADERS)
  set(HIVE_TORCH_PCH_HEADERS <ATen/ATen.h> <asio.hpp> <nlohmann/json.hpp> <fmt/format.h>)
endif()

# Per-test limit, so a hung test fails CI instead of blocking it until the job is killed.
set(HIVE_TEST_TIMEOUT 300 CACHE STRING "Seconds before ctest kills one test")

# Warnings for code we own; third-party headers come in as SYSTEM and stay quiet.
function(hive_target_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra)
endfunction()

# One target owns the torch PCH and every torch target reuses it (REUSE_FROM), so the PCH
# (~25 s and ~0.5 GB) is built once per build tree, not once per program.
# REUSE_FROM needs the same compile flags, hence the owner links what its users link.
if(TARGET hive::hive AND HIVE_TORCH_PCH_HEADERS AND NOT TARGET hive_torch_pch)
  set(_hive_pch_src ${CMAKE_BINARY_DIR}/hive_torch_pch.cpp)
  file(CONFIGURE OUTPUT ${_hive_pch_src}
    CONTENT "// The owner of the torch precompiled header has to compile something.\n")
  add_library(hive_torch_pch OBJECT EXCLUDE_FROM_ALL ${_hive_pch_src})
  target_link_libraries(hive_torch_pch PRIVATE hive::hive)
  hive_target_warnings(hive_torch_pch)
  target_precompile_headers(hive_torch_pch PRIVATE ${HIVE_TORCH_PCH_HEADERS})
endif()

# Let a torch target use the shared PCH. Sources listed after the target skip it: a TU
# that never includes torch (a doctest main) would only pay the PCH's load time.
function(hive_use_torch_pch target)
  if(NOT TARGET hive_torch_pch)
    return()
  endif()
  target_precompile_headers(${target} REUSE_FROM hive_torch_pch)
  if(ARGN)
    set_source_files_properties(${ARGN} TARGET_DIRECTORY ${target}
      PROPERTIES SKIP_PRECOMPILE_HEADERS ON)
  endif()
endfunction()

# hive_add_program(<name> SOURCES <files...> [CORE_ONLY])
#
# An executable of ours: CORE_ONLY links hive::core (compiles in seconds, no libtorch);
# otherwise it links hive::hive and reuses the torch PCH. Without libtorch a torch program
# is skipped with a message rather than failing the configure of a DHT-only build.
function(hive_add_program name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "CORE_ONLY" "" "SOURCES")
  if(NOT arg_SOURCES)
    message(FATAL_ERROR "hive_add_program(${name}): SOURCES is required")
  endif()
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "hive_add_program(${name}): unknown arguments ${arg_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT arg_CORE_ONLY AND NOT TARGET hive::hive)
    message(STATUS "hive: skipping ${name}, it needs libtorch")
    return()
  endif()
  add_executable(${name} ${arg_SOURCES})
  hive_target_warnings(${name})
  if(arg_CORE_ONLY)
    target_link_libraries(${name} PRIVATE hive::core)
  else()
    target_link_libraries(${name} PRIVATE hive::hive)
    hive_use_torch_pch(${name})
  endif()
endfunction()

# hive_add_programs(<entry>...) with entries "<name>:<source>[:CORE_ONLY]": adds each program
# whose source exists, so a planned example builds as soon as its file lands. A .cpp in the
# directory that no entry names is built too (with torch when available, named after the
# file), so nothing sits unbuilt; list it to pick its name or make it CORE_ONLY.
function(hive_add_programs)
  # CONFIGURE_DEPENDS re-runs CMake when a .cpp appears or disappears, so no edit is needed.
  file(GLOB _present RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} CONFIGURE_DEPENDS
    ${CMAKE_CURRENT_SOURCE_DIR}/*.cpp)
  set(_listed)
  foreach(_entry IN LISTS ARGN)
    string(REPLACE ":" ";" _parts "${_entry}")
    list(LENGTH _parts _n)
    if(_n LESS 2 OR _n GREATER 3)
      message(FATAL_ERROR "hive_add_programs: '${_entry}' is not <target>:<source>[:CORE_ONLY]")
    endif()
    list(GET _parts 0 _name)
    list(GET _parts 1 _src)
    set(_flags)
    if(_n EQUAL 3)
      list(GET _parts 2 _flags)
    endif()
    list(APPEND _listed ${_src})
    if(_src IN_LIST _present)
      hive_add_program(${_name} SOURCES ${_src} ${_flags})
    endif()
  endforeach()
  foreach(_src IN LISTS _present)
    if(NOT _src IN_LIST _listed)
      get_filename_component(_name ${_src} NAME_WE)
      if(TARGET hive::hive)
        message(STATUS "hive: ${CMAKE_CURRENT_SOURCE_DIR}/${_src} is not listed; building it as torch program ${_name}")
        hive_add_program(${_name} SOURCES ${_src})
      else()
        hive_add_program(${_name} SOURCES ${_src} CORE_ONLY)
      endif()
    endif()
  endforeach()
endfunction()
