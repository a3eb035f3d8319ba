#pragma once
struct __nv_bfloat16 { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 v) { unsigned u = (unsigned)v.x << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16(float f) { unsigned u; __builtin_memcpy(&u, &f, 4); return __nv_bfloat16{(unsigned short)(u >> 16)}; }
