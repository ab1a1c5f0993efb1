# cmake -P script behind the `layering` test: checks the include rules of docs/architecture.md.
#
#   -D HIVE_SOURCE_DIR=<repo root>
#
# hive::core not linking torch catches less than it seems: Debian installs ATen and c10 in
# /usr/include, so a stray <ATen/...> in core/ compiles without the torch target, and links
# too as long as it only touches inline code. Hence this textual check:
#   1. include/hive/{core,net,dht,detail}/ and tests/core/ include no torch, ATen, c10 or
#      caffe2 header, and not the tensor codec, which is the one file in core/ allowed ATen;
#   2. a layer includes only itself and the layers above it:
#      core < net < dht < moe < averaging < optim < serve; detail/ and fwd.hpp go anywhere.
if(NOT HIVE_SOURCE_DIR)
  message(FATAL_ERROR "HiveCheckLayers.cmake: HIVE_SOURCE_DIR is required")
endif()

set(_layers core net dht moe averaging optim serve)
set(_torch_free_dirs include/hive/core include/hive/net include/hive/dht include/hive/detail
  tests/core)
set(_codec include/hive/core/tensor_codec.hpp)
set(_include_re "^[ \t]*#[ \t]*include[ \t]*[<\"]([^>\"]+)[>\"]")

set(_violations)
file(GLOB_RECURSE _files RELATIVE ${HIVE_SOURCE_DIR}
  ${HIVE_SOURCE_DIR}/include/hive/*.hpp ${HIVE_SOURCE_DIR}/include/hive/*.ipp
  ${HIVE_SOURCE_DIR}/include/hive/*.h ${HIVE_SOURCE_DIR}/tests/core/*)
foreach(_file IN LISTS _files)
  set(_torch_free FALSE)
  foreach(_dir IN LISTS _torch_free_dirs)
    if(_file MATCHES "^${_dir}/" AND NOT _file STREQUAL _codec)
      set(_torch_free TRUE)
    endif()
  endforeach()
  set(_rank -1)
  if(_file MATCHES "^include/hive/([^/]+)/")
    list(FIND _layers "${CMAKE_MATCH_1}" _rank)
  endif()

  file(STRINGS ${HIVE_SOURCE_DIR}/${_file} _lines REGEX "${_include_re}")
  foreach(_line IN LISTS _lines)
    if(NOT _line MATCHES "${_include_re}")
      continue()
    endif()
    set(_inc "${CMAKE_MATCH_1}")
    if(_torch_free AND (_inc MATCHES "^(torch|ATen|c10|caffe2)/" OR _inc STREQUAL "hive/core/tensor_codec.hpp"))
      list(APPEND _violations "${_file}: includes <${_inc}>, but this layer must build without libtorch")
    endif()
    if(_rank GREATER_EQUAL 0 AND _inc MATCHES "^hive/([^/]+)/")
      list(FIND _layers "${CMAKE_MATCH_1}" _inc_rank)
      if(_inc_rank GREATER _rank)
        list(APPEND _violations "${_file}: includes <${_inc}>, a layer below its own")
      endif()
    endif()
  endforeach()
endforeach()

list(LENGTH _files _count)
if(_violations)
  list(JOIN _violations "\n  " _text)
  message(FATAL_ERROR "include rules broken (see docs/architecture.md):\n  ${_text}")
endif()
message(STATUS "include rules hold in ${_count} files")
