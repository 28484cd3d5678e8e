/* The one seam to BLAS/LAPACK: OpenBLAS's cblas and the reference LAPACKE
   (Debian's OpenBLAS 0.3.21 ships no LAPACKE, so both libraries are linked). */
#ifndef TENGRAD_COPENBLAS_SHIM_H
#define TENGRAD_COPENBLAS_SHIM_H
#include <cblas.h>
#include <lapacke.h>
#endif
