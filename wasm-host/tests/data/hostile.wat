;; A hand-written proxy-wasm module against the raw ABI, for the host's bad-input tests. Its
;; behaviour in proxy_on_request_headers is chosen by the number of request headers:
;;   3: loops forever                    4: grows memory until refused, then traps
;;   5: hands the host out-of-bounds pointers and lengths; traps unless every call says
;;      InvalidMemoryAccess (6)
;;   6: sets a header map whose count lies (1000 pairs, holds 1); traps unless BadArgument (2)
;;   7: traps at once
;; Anything else is served: it adds `x-served: yes` and continues.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "x-served\00yes")
  (data (i32.const 64) "\e8\03\00\00\01\00\00\00\01\00\00\00a\00b\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.eq (local.get $n) (i32.const 3)) (then (loop $spin (br $spin))))
    (if (i32.eq (local.get $n) (i32.const 4)) (then
      (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      (unreachable)))
    (if (i32.eq (local.get $n) (i32.const 5)) (then
      (if (i32.ne (call $log (i32.const 2) (i32.const 0x7fffff00) (i32.const 1000)) (i32.const 6))
        (then (unreachable)))
      (if (i32.ne (call $value (i32.const 0) (i32.const 0xfffff0) (i32.const 64) (i32.const 128) (i32.const 132)) (i32.const 6))
        (then (unreachable)))
      (if (i32.ne (call $pairs (i32.const 0) (i32.const 0x7ffffff0) (i32.const 132)) (i32.const 6))
        (then (unreachable)))))
    (if (i32.eq (local.get $n) (i32.const 6)) (then
      (if (i32.ne (call $set_pairs (i32.const 0) (i32.const 64) (i32.const 18)) (i32.const 2))
        (then (unreachable)))))
    (if (i32.eq (local.get $n) (i32.const 7)) (then (unreachable)))
    (drop (call $add (i32.const 0) (i32.const 16) (i32.const 8) (i32.const 25) (i32.const 3)))
    (i32.const 0))
)
