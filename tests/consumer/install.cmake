# cmake -P script, run by the consumer_install test: installs the hive build tree into a
# prefix of its own for tests/consumer to find.
#
#   -D HIVE_BUILD_DIR=<build tree> -D HIVE_PREFIX=<prefix> [-D HIVE_CONFIG=<config>]
#   [-D HIVE_COMPONENT=<install component>] [-D HIVE_CLEAN_DIRS=<dirs to empty first>]
foreach(_var HIVE_BUILD_DIR HIVE_PREFIX)
  if(NOT ${_var})
    message(FATAL_ERROR "install.cmake: ${_var} is required")
  endif()
endforeach()

# A fresh prefix every run: a file dropped from the install rules must not survive as a
# stale copy that keeps the consumer passing. Stale consumer builds go too, since their
# caches remember where hive was found.
file(REMOVE_RECURSE ${HIVE_PREFIX} ${HIVE_CLEAN_DIRS})

set(_args --install ${HIVE_BUILD_DIR} --prefix ${HIVE_PREFIX})
if(HIVE_CONFIG)
  list(APPEND _args --config ${HIVE_CONFIG})
endif()
if(HIVE_COMPONENT)
  list(APPEND _args --component ${HIVE_COMPONENT})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} ${_args} COMMAND_ERROR_IS_FATAL ANY)
