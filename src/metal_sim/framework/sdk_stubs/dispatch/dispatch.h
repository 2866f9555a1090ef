// metal-sim: opaque libdispatch types that metal-cpp's headers name; metal-sim never calls libdispatch.
#pragma once
typedef struct dispatch_queue_s* dispatch_queue_t;
typedef struct dispatch_data_s* dispatch_data_t;
