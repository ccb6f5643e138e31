//! The 32-bit entry points and the switch to long mode.
//!
//! Both boot protocols enter in 32-bit protected mode with paging off:
//! multiboot (v1 and v2) at the ELF entry point with the magic in EAX and the
//! information structure's physical address in EBX, PVH at the address named
//! by the PVH ELF note with the start-info address in EBX. The trampoline
//! zeroes its page tables, identity-maps the first 8 GiB with 2 MiB pages,
//! enables PAE, long mode and paging, loads a 64-bit GDT and calls
//! `tern_entry64(protocol: u32, info: u32)`, which the binary defines.
//!
//! The symbols are referenced from the binary's linker script (`ENTRY`) and
//! from the PVH note, which is what pulls this object into the link.

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .boot.text, "ax"
    .code32
    .global boot_entry_multiboot
    .global boot_entry_pvh

boot_entry_multiboot:
    cli
    cld
    mov $0, %edi
    cmp $0x36d76289, %eax
    jne 1f
    mov $2, %edi            /* multiboot2 */
    jmp 3f
1:  cmp $0x2BADB002, %eax
    jne 3f
    mov $1, %edi            /* multiboot v1 */
    jmp 3f

boot_entry_pvh:
    cli
    cld
    mov $3, %edi            /* PVH */

3:  mov %ebx, %esi
    mov $boot_stack_top, %esp

    /* Zero the page tables (PML4, PDPT, 8 PDs). */
    mov $boot_page_tables, %ebp
    push %edi
    mov %ebp, %edi
    xor %eax, %eax
    mov $(10 * 4096 / 4), %ecx
    rep stosl
    pop %edi

    /* PML4[0] -> PDPT */
    lea 0x1000(%ebp), %eax
    or $0x3, %eax
    mov %eax, 0(%ebp)
    /* PDPT[0..8] -> PD0..PD7 */
    lea 0x2003(%ebp), %eax
    xor %ecx, %ecx
7:  mov %eax, 0x1000(%ebp, %ecx, 8)
    add $0x1000, %eax
    inc %ecx
    cmp $8, %ecx
    jne 7b
    /* 4096 PD entries of 2 MiB each: present, writable, large. */
    lea 0x2000(%ebp), %ebx
    xor %ecx, %ecx
4:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%ebx, %ecx, 8)
    mov %ecx, %eax
    shr $11, %eax
    mov %eax, 4(%ebx, %ecx, 8)
    inc %ecx
    cmp $4096, %ecx
    jne 4b

    /* CR4.PAE */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov %ebp, %cr3
    /* EFER.LME */
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    /* CR0.PG | CR0.PE */
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $5f

    .code64
5:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov %edi, %edi
    mov %esi, %esi
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    call tern_entry64
6:  cli
    hlt
    jmp 6b

    .section .boot.rodata, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
boot_gdt_end:
    .balign 4
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_page_tables
boot_page_tables:
    .skip 10 * 4096
    .balign 16
    .global boot_stack_bottom
boot_stack_bottom:
    .skip 256 * 1024
    .global boot_stack_top
boot_stack_top:
"#,
    options(att_syntax)
);

/// Emits the multiboot2 header (no tags but the end tag: the image is an
/// ELF, so GRUB takes the load addresses and entry point from it).
#[macro_export]
macro_rules! multiboot2_header {
    () => {
        #[cfg(target_os = "none")]
        core::arch::global_asm!(
            r#"
            .section .multiboot_header, "a"
            .balign 8
        2:  .long 0xE85250D6
            .long 0
            .long 3f - 2b
            .long 0x100000000 - (0xE85250D6 + (3f - 2b))
            .word 0, 0
            .long 8
        3:
        "#,
            options(att_syntax)
        );
    };
}

/// Emits the PVH ELF note (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18) pointing at
/// `boot_entry_pvh`, so QEMU's `-kernel` can start the ELF64 image directly.
#[macro_export]
macro_rules! pvh_note {
    () => {
        #[cfg(target_os = "none")]
        core::arch::global_asm!(
            r#"
            .section .note.pvh, "a", @note
            .balign 4
            .long 4
            .long 8
            .long 18
            .asciz "Xen"
            .balign 4
            .quad boot_entry_pvh
            .balign 4
        "#,
            options(att_syntax)
        );
    };
}

/// Emits a multiboot (v1) header. Used by the test guest, which Tern (and
/// QEMU's `-kernel`) load from its ELF program headers.
#[macro_export]
macro_rules! multiboot1_header {
    () => {
        #[cfg(target_os = "none")]
        core::arch::global_asm!(
            r#"
            .section .multiboot_header, "a"
            .balign 4
            .long 0x1BADB002
            .long 0x00000003
            .long 0x100000000 - (0x1BADB002 + 0x00000003)
        "#,
            options(att_syntax)
        );
    };
}
