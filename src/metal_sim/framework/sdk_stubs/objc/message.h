// metal-sim: GCC's Objective-C runtime (libobjc) has no objc_msgSend; metal-sim's trampoline
// (src/metal_sim/framework/objc_msgsend_x86_64.S) provides it and these declarations name it for metal-cpp.
#pragma once
#include_next <objc/message.h>
#ifdef __cplusplus
extern "C" {
#endif
void objc_msgSend(void);
void objc_msgSend_stret(void);
void objc_msgSend_fpret(void);
#ifdef __cplusplus
}
#endif
