// Anomaly-map post-processing on the device: bilinear upsample of the patch grid (OpenCV's INTER_LINEAR:
// half-pixel centres, edges clamped), separable Gaussian blur (OpenCV's BORDER_REFLECT_101, weights
// passed in), and the map's maximum. One thread per output pixel; maps are batched along blockIdx.z.

extern "C" __global__ void upsample_bilinear(const float* src, int h, int w, float* dst, int H, int W) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y, z = blockIdx.z;
    if (x >= W || y >= H) return;
    src += (size_t)z * h * w; dst += (size_t)z * H * W;
    float fx = fmaxf((x + 0.5f) * w / W - 0.5f, 0.f), fy = fmaxf((y + 0.5f) * h / H - 0.5f, 0.f);
    int x0 = min((int)fx, w - 1), y0 = min((int)fy, h - 1), x1 = min(x0 + 1, w - 1), y1 = min(y0 + 1, h - 1);
    float ax = fx - x0, ay = fy - y0;
    dst[(size_t)y * W + x] = (1 - ay) * ((1 - ax) * src[y0 * w + x0] + ax * src[y0 * w + x1])
                           + ay * ((1 - ax) * src[y1 * w + x0] + ax * src[y1 * w + x1]);
}

__device__ __forceinline__ int reflect101(int i, int n) {
    if (n == 1) return 0;
    while (i < 0 || i >= n) i = i < 0 ? -i : 2 * n - 2 - i;
    return i;
}

// axis 0: along rows (x), axis 1: along columns (y). weights has 2 * radius + 1 entries.
extern "C" __global__ void gaussian_1d(const float* src, float* dst, int H, int W, const float* weights,
                                       int radius, int axis) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y, z = blockIdx.z;
    if (x >= W || y >= H) return;
    src += (size_t)z * H * W; dst += (size_t)z * H * W;
    float acc = 0.f;
    for (int k = -radius; k <= radius; ++k) {
        float v = axis == 0 ? src[(size_t)y * W + reflect101(x + k, W)] : src[(size_t)reflect101(y + k, H) * W + x];
        acc += weights[k + radius] * v;
    }
    dst[(size_t)y * W + x] = acc;
}

// Float max through integer atomics: order-preserving map of float bits to unsigned int.
__device__ __forceinline__ unsigned int ordered(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// out[z] must start at 0 (ordered(-inf) > 0). Read back with `unordered` on the host.
extern "C" __global__ void map_max(const float* maps, int size, unsigned int* out) {
    __shared__ unsigned int best[256];
    int z = blockIdx.y;
    unsigned int b = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < size; i += gridDim.x * blockDim.x)
        b = max(b, ordered(maps[(size_t)z * size + i]));
    best[threadIdx.x] = b;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) best[threadIdx.x] = max(best[threadIdx.x], best[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicMax(out + z, best[0]);
}
