/* The one seam to BLAS/LAPACK, system build: the distribution's OpenBLAS cblas and the reference
   LAPACKE (Debian's OpenBLAS 0.3.21 ships no LAPACKE, so both libraries are linked). The other
   build, Sources/CScipyOpenBLAS, offers the same names. */
#ifndef TENGRAD_COPENBLAS_SHIM_H
#define TENGRAD_COPENBLAS_SHIM_H
#include <cblas.h>
#include <lapacke.h>

#define TENGRAD_BLAS_BUILD "system"
#endif
