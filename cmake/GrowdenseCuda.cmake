# Whether the CUDA kernels are built: the rule, as functions that tests can run with
# made-up versions (cmake -P, no compiler or torch needed).
#
# The CUDA kernels compile against the CUDA headers that come with torch's wheels, which
# must be the CUDA release of nvcc (major.minor): with another release nvcc stops with
# "CUDA compiler and CUDA toolkit headers are incompatible". A system toolkit older or
# newer than torch's is common, so AUTO then builds the CPU-only extension and says why;
# ON makes it an error that names both releases and the fix.

# growdense_nvcc_release(<nvcc> <out_var>): nvcc's CUDA release ("13.0"), "" if unreadable.
function(growdense_nvcc_release nvcc out_var)
  execute_process(COMMAND "${nvcc}" --version OUTPUT_VARIABLE _text ERROR_QUIET RESULT_VARIABLE _rc)
  set(_release "")
  if(_rc EQUAL 0 AND _text MATCHES "release ([0-9]+\\.[0-9]+)")
    set(_release "${CMAKE_MATCH_1}")
  endif()
  set(${out_var} "${_release}" PARENT_SCOPE)
endfunction()

# growdense_major_minor(<version> <out_var>): "13.0" from "13.0", "13.0.1" or "13.0.88".
function(growdense_major_minor version out_var)
  set(_mm "")
  if(version MATCHES "^([0-9]+)\\.([0-9]+)")
    set(_mm "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
  endif()
  set(${out_var} "${_mm}" PARENT_SCOPE)
endfunction()

# growdense_decide_cuda(<mode> <torch_version> <torch_cuda> <nvcc> <nvcc_release> <has_sources> <out_var>)
#   mode: AUTO (or empty), ON or OFF (GROWDENSE_CUDA); torch_cuda: torch.version.cuda ("" for a
#   CPU-only torch); nvcc: its path ("" when not found); nvcc_release: its release ("13.0");
#   has_sources: whether csrc/cuda holds sources. Sets out_var to ON or OFF; says why when OFF
#   (a warning when the releases differ); a fatal error when mode is ON and the kernels cannot
#   be built.
function(growdense_decide_cuda mode torch_version torch_cuda nvcc nvcc_release has_sources out_var)
  string(TOUPPER "${mode}" mode)
  if(mode STREQUAL "")
    set(mode AUTO)
  endif()
  if(NOT mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "GROWDENSE_CUDA must be AUTO, ON or OFF, got '${mode}'")
  endif()
  set(_with OFF)
  set(_mismatch OFF)
  growdense_major_minor("${torch_cuda}" _torch_mm)
  growdense_major_minor("${nvcc_release}" _nvcc_mm)
  if(mode STREQUAL "OFF")
    set(_why "GROWDENSE_CUDA=OFF")
  elseif(torch_cuda STREQUAL "")
    set(_why "the installed torch ${torch_version} is a CPU-only build")
  elseif(nvcc STREQUAL "")
    set(_why "nvcc was not found (set CUDA_HOME or CMAKE_CUDA_COMPILER)")
  elseif(NOT has_sources)
    set(_why "there are no CUDA sources")
  elseif(_nvcc_mm STREQUAL "")
    set(_why "the CUDA release of ${nvcc} could not be read from 'nvcc --version'")
  elseif(NOT _nvcc_mm STREQUAL _torch_mm)
    set(_mismatch ON)
    string(CONCAT _why "nvcc (${nvcc}) is CUDA ${_nvcc_mm} while torch ${torch_version} was built with CUDA "
           "${_torch_mm}, and the CUDA headers of torch's wheels need the same release. For the CUDA kernels, point "
           "CUDA_HOME at a CUDA ${_torch_mm} toolkit, or install a torch built for CUDA ${_nvcc_mm}; "
           "GROWDENSE_CUDA=OFF builds the CPU-only extension without this message")
  else()
    set(_with ON)
  endif()
  if(NOT _with AND NOT mode STREQUAL "OFF")
    if(mode STREQUAL "ON")
      message(FATAL_ERROR "GROWDENSE_CUDA=ON but ${_why}")
    elseif(_mismatch)
      message(WARNING "growdense: building the CPU-only extension (no CUDA kernels): ${_why}")
    else()
      message(STATUS "growdense: building without CUDA kernels: ${_why}")
    endif()
  endif()
  set(${out_var} ${_with} PARENT_SCOPE)
endfunction()
