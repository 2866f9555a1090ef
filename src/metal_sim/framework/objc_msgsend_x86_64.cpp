// metal-sim: objc_msgSend for GCC's Objective-C runtime on x86-64 (which has only objc_msg_lookup).
// metal-cpp casts objc_msgSend to the method's C type and calls it, so at entry the registers hold the
// method's arguments: save them, look the method up (me_sim_objc_lookup: self, selector), restore them
// and tail-jump to it. Arguments passed on the stack (an MTL::Size by value) are never touched. The
// _stret variant carries the hidden struct-return pointer in rdi, so self and the selector sit one
// register later; the method, typed to return the struct, expects exactly that. _fpret is objc_msgSend
// on x86-64 (only long double returns differ, and no Metal method returns one).

#if defined(__x86_64__)
asm(R"ASM(
  .text

.macro ME_SIM_MSGSEND name, self, sel
  .globl \name
  .type \name, @function
\name:
  .cfi_startproc
  subq $200, %rsp                 # 8 xmm (128) + 7 gprs (56) + padding: rsp is 16-aligned after this
  .cfi_adjust_cfa_offset 200
  movdqu %xmm0, 0(%rsp)
  movdqu %xmm1, 16(%rsp)
  movdqu %xmm2, 32(%rsp)
  movdqu %xmm3, 48(%rsp)
  movdqu %xmm4, 64(%rsp)
  movdqu %xmm5, 80(%rsp)
  movdqu %xmm6, 96(%rsp)
  movdqu %xmm7, 112(%rsp)
  movq %rdi, 128(%rsp)
  movq %rsi, 136(%rsp)
  movq %rdx, 144(%rsp)
  movq %rcx, 152(%rsp)
  movq %r8, 160(%rsp)
  movq %r9, 168(%rsp)
  movq %rax, 176(%rsp)            # the vector-register count of a variadic call
  movq \self, %rdi
  movq \sel, %rsi
  call me_sim_objc_lookup
  movq %rax, %r11
  movdqu 0(%rsp), %xmm0
  movdqu 16(%rsp), %xmm1
  movdqu 32(%rsp), %xmm2
  movdqu 48(%rsp), %xmm3
  movdqu 64(%rsp), %xmm4
  movdqu 80(%rsp), %xmm5
  movdqu 96(%rsp), %xmm6
  movdqu 112(%rsp), %xmm7
  movq 128(%rsp), %rdi
  movq 136(%rsp), %rsi
  movq 144(%rsp), %rdx
  movq 152(%rsp), %rcx
  movq 160(%rsp), %r8
  movq 168(%rsp), %r9
  movq 176(%rsp), %rax
  addq $200, %rsp
  .cfi_adjust_cfa_offset -200
  jmp *%r11
  .cfi_endproc
  .size \name, .-\name
.endm

ME_SIM_MSGSEND objc_msgSend, %rdi, %rsi
ME_SIM_MSGSEND objc_msgSend_fpret, %rdi, %rsi
ME_SIM_MSGSEND objc_msgSend_stret, %rsi, %rdx

  .section .note.GNU-stack,"",@progbits
)ASM");
#else
#error "metal-sim's objc_msgSend trampoline is written for x86-64"
#endif
