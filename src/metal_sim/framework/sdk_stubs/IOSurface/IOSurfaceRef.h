// metal-sim: the opaque IOSurface type metal-cpp's headers name; metal-sim has no IOSurfaces.
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
