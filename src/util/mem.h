// Large buffers (activations, workspaces, parameters, optimiser state) on 2 MiB pages where
// the kernel offers transparent huge pages on request (THP "madvise" mode, Debian's default):
// the step walks hundreds of MiB of them and 4 KiB pages cost it TLB misses. Small requests,
// and systems without huge pages, get plain malloc memory. Free with free().
#pragma once
#include <stddef.h>

// bytes of uninitialised memory, or NULL.
void *mem_alloc(size_t bytes);
// n * size bytes of zeros (NULL on overflow or when out of memory).
void *mem_calloc(size_t n, size_t size);
