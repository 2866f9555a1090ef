// metal-sim: the little of CoreFoundation that metal-cpp's headers name (on Linux, in place of Apple's SDK).
#pragma once
#include <math.h>  // metal-cpp expects INFINITY and friends through CoreFoundation
#include <dispatch/dispatch.h>  // and the dispatch types
typedef double CFTimeInterval;
