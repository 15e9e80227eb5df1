# Injected before llama.cpp's project() when building llama-cpp-python for the tests: the server
# needs only libllama, so skip the force-enabled llama-common library (a large share of the build).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)
