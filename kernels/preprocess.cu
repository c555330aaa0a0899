// Fused preprocessing: a uint8 grey/BGR/BGRA HWC frame -> resize -> colour order -> (x - mean) / std
// -> planar CHW float32 or float16, in one pass. One thread per output pixel.
//
// Resize follows OpenCV's INTER_AREA, which the CPU path uses: when shrinking, each output pixel is the
// average of the source area it covers (fractional edges weighted by coverage); otherwise OpenCV's
// two-tap "area enlarge" weights (the split follows where the output pixel's edge falls).
// colour: 0 = RGB out, 1 = BGR out, 2 = grey out (repeated over c_out planes).
#include <cuda_fp16.h>

__device__ __forceinline__ void load_px(const unsigned char* row, int x, int c_in, float* bgr) {
    const unsigned char* p = row + x * c_in;
    if (c_in == 1) { bgr[0] = bgr[1] = bgr[2] = (float)p[0]; }
    else { bgr[0] = (float)p[0]; bgr[1] = (float)p[1]; bgr[2] = (float)p[2]; }
}

// Returns the second tap's weight and sets *i to the first tap's index.
__device__ __forceinline__ float enlarge_tap(int o, int n_in, int n_out, int* i) {
    double s = (double)n_in / n_out, inv = (double)n_out / n_in;
    int i0 = (int)floor(o * s);
    double f = (o + 1) - (i0 + 1) * inv;
    f = f <= 0 ? 0.0 : f - floor(f);
    if (i0 >= n_in - 1) { i0 = n_in - 1; f = 0.0; }
    *i = i0;
    return (float)f;
}

__device__ __forceinline__ void sample(const unsigned char* src, int h, int w, int c_in, int pitch,
                                       int ox, int oy, int out_h, int out_w, float* bgr) {
    float sx = (float)w / out_w, sy = (float)h / out_h;
    bgr[0] = bgr[1] = bgr[2] = 0.f;
    if (sx >= 1.f && sy >= 1.f) {  // area average
        float x0 = ox * sx, x1 = x0 + sx, y0 = oy * sy, y1 = y0 + sy;
        int ix0 = (int)floorf(x0), ix1 = min((int)ceilf(x1), w), iy0 = (int)floorf(y0), iy1 = min((int)ceilf(y1), h);
        float px[3];
        for (int iy = iy0; iy < iy1; ++iy) {
            float wy = fminf((float)(iy + 1), y1) - fmaxf((float)iy, y0);
            const unsigned char* row = src + (size_t)iy * pitch;
            for (int ix = ix0; ix < ix1; ++ix) {
                float wgt = wy * (fminf((float)(ix + 1), x1) - fmaxf((float)ix, x0));
                load_px(row, ix, c_in, px);
                bgr[0] += wgt * px[0]; bgr[1] += wgt * px[1]; bgr[2] += wgt * px[2];
            }
        }
        float inv = 1.f / (sx * sy);
        bgr[0] *= inv; bgr[1] *= inv; bgr[2] *= inv;
    } else {  // two taps per axis, as OpenCV's INTER_AREA does when not shrinking both ways
        int x0, y0;
        float ax = enlarge_tap(ox, w, out_w, &x0), ay = enlarge_tap(oy, h, out_h, &y0);
        int x1 = min(x0 + 1, w - 1), y1 = min(y0 + 1, h - 1);
        float a[3], b[3], c[3], d[3];
        load_px(src + (size_t)y0 * pitch, x0, c_in, a); load_px(src + (size_t)y0 * pitch, x1, c_in, b);
        load_px(src + (size_t)y1 * pitch, x0, c_in, c); load_px(src + (size_t)y1 * pitch, x1, c_in, d);
        for (int k = 0; k < 3; ++k)
            bgr[k] = (1 - ay) * ((1 - ax) * a[k] + ax * b[k]) + ay * ((1 - ax) * c[k] + ax * d[k]);
    }
}

#define PREPROCESS(NAME, T, CONVERT)                                                                     \
extern "C" __global__ void NAME(const unsigned char* src, int h, int w, int c_in, int pitch, T* dst,      \
                                int out_h, int out_w, int colour, int c_out,                              \
                                float m0, float m1, float m2, float is0, float is1, float is2) {         \
    int ox = blockIdx.x * blockDim.x + threadIdx.x, oy = blockIdx.y * blockDim.y + threadIdx.y;          \
    if (ox >= out_w || oy >= out_h) return;                                                               \
    float bgr[3];                                                                                         \
    if (colour == 2 && c_in != 1) {  /* grey first, then resize, as the CPU path does */                \
        /* area/bilinear of the grey plane equals the same weights applied to grey values */             \
        sample(src, h, w, c_in, pitch, ox, oy, out_h, out_w, bgr);                                       \
        float g = 0.114f * bgr[0] + 0.587f * bgr[1] + 0.299f * bgr[2];                                   \
        bgr[0] = bgr[1] = bgr[2] = g;                                                                     \
    } else {                                                                                              \
        sample(src, h, w, c_in, pitch, ox, oy, out_h, out_w, bgr);                                       \
    }                                                                                                     \
    float v[3];                                                                                           \
    if (colour == 0) { v[0] = bgr[2]; v[1] = bgr[1]; v[2] = bgr[0]; }                                     \
    else { v[0] = bgr[0]; v[1] = bgr[1]; v[2] = bgr[2]; }                                                 \
    float m[3] = {m0, m1, m2}, is[3] = {is0, is1, is2};                                                   \
    size_t plane = (size_t)out_h * out_w, at = (size_t)oy * out_w + ox;                                   \
    for (int k = 0; k < c_out; ++k) dst[k * plane + at] = CONVERT((v[k] - m[k]) * is[k]);               \
}

#define AS_FLOAT(x) (x)
PREPROCESS(preprocess_f32, float, AS_FLOAT)
PREPROCESS(preprocess_f16, __half, __float2half)
