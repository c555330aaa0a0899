// Patch nearest neighbour with the min fused into the tiles: for each of N query rows, the squared L2
// distance to its nearest row of an M x C bank. Each 32 x 32 block of threads takes 32 queries against
// 32 bank rows at a time (channels staged through shared memory in chunks of 32), reduces the 32
// distances of each query with warp shuffles and keeps a running minimum, so no N x M matrix is ever
// written. bank_sq holds ||b||^2 per bank row. Rows are read with strides ldq/ldb so one channel group
// of a wider array can be searched in place. Unit-norm rows give cosine: 1 - cos = d / 2.
#define T 32

extern "C" __global__ void nn_min_sqdist(const float* __restrict__ q, int n, int ldq,
                                         const float* __restrict__ bank, const float* __restrict__ bank_sq,
                                         int m, int ldb, int c, float* __restrict__ out) {
    __shared__ float qs[T][T + 1];
    __shared__ float bs[T][T + 1];
    int tx = threadIdx.x, ty = threadIdx.y;          // tx: bank row in the tile, ty: query in the tile
    int qi = blockIdx.x * T + ty;
    float best = 3.402823466e38f, qsq = 0.f;
    for (int b0 = 0; b0 < m; b0 += T) {
        float acc = 0.f;
        for (int c0 = 0; c0 < c; c0 += T) {
            int qrow = blockIdx.x * T + ty, ch = c0 + tx;
            qs[ty][tx] = (qrow < n && ch < c) ? q[(size_t)qrow * ldq + ch] : 0.f;
            int brow = b0 + ty;
            bs[ty][tx] = (brow < m && ch < c) ? bank[(size_t)brow * ldb + ch] : 0.f;
            __syncthreads();
            #pragma unroll
            for (int k = 0; k < T; ++k) acc += qs[ty][k] * bs[tx][k];
            if (b0 == 0 && tx == 0) {
                #pragma unroll
                for (int k = 0; k < T; ++k) qsq += qs[ty][k] * qs[ty][k];
            }
            __syncthreads();
        }
        float d = (b0 + tx < m) ? bank_sq[b0 + tx] - 2.f * acc : 3.402823466e38f;
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) d = fminf(d, __shfl_down_sync(0xffffffffu, d, off));
        if (tx == 0) best = fminf(best, d);
    }
    if (tx == 0 && qi < n) out[qi] = fmaxf(best + qsq, 0.f);
}
