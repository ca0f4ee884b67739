;; raw-abi.wat: a hand-written proxy-wasm (ABI 0.2.1) module that hands the host bad pointers
;; and lying lengths, for the host's memory-safety tests. No SDK: every byte is deliberate.
;;
;; Which misbehaviour runs is chosen by the SIZE in bytes of the plugin configuration (what
;; proxy_on_configure receives; the content does not matter, e.g. "1", "22", "333"). Size 0,
;; or a size without a case, makes proxy_on_request_headers do nothing and return Continue.
;; Otherwise proxy_on_request_headers makes ONE bad host call, then logs at info (level 2)
;;
;;     raw-abi case <N> status <SS>
;;
;; with the status the host returned (two digits, e.g. "00" OK, "02" BadArgument, "06"
;; InvalidMemoryAccess), and returns Continue. A correct host returns an error status (and must
;; not crash, write outside the module's memory, or read past its end); the module survives.
;;
;; | size | call |
;; | --- | --- |
;; | 1 | proxy_get_header_map_value(request headers, key_ptr = 0x7fff0000 (far beyond memory), key_size = 5, ...) |
;; | 2 | proxy_get_header_map_value(request headers, ":path", return_ptr/return_size out-params at 0xfffffff0/0xfffffff4 (beyond memory)) |
;; | 3 | proxy_set_header_map_pairs(request headers, buffer whose count says 1000 but holds 1 pair "a: b", size 18) |
;; | 4 | proxy_log(info, ptr = end of memory - 16, size = 4096: runs past the end) |
;; | 5 | proxy_set_header_map_pairs(request headers, ptr = end of memory - 8, size = 256: runs past the end) |
;; | 6 | proxy_get_header_map_value(request headers, key_ptr = 0xfffe, key_size = 0xffffffff: ptr + size wraps 32 bits) |
;; | 7 | proxy_log(level 99 (no such level), "raw-abi", 7) |
;; | 8 | proxy_send_local_response(403, no details, no body, headers = the lying 1000-count buffer of case 3) |
;;
;; Memory: one page at start, grown by proxy_on_memory_allocate (a bump allocator from 0x1000)
;; only when the host allocates more than fits; "end of memory" is computed at call time.
(module
  (type $log_t (func (param i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $proxy_log (type $log_t)))
  (import "env" "proxy_get_header_map_value"
    (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs"
    (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; Next free byte for proxy_on_memory_allocate.
  (global $heap (mut i32) (i32.const 0x1000))
  ;; The case: the plugin configuration size.
  (global $case (mut i32) (i32.const 0))

  ;; 0x080/0x084: out-params (return pointer, return size).
  ;; 0x100: a key for case 1's length; 0x110: ":path".
  (data (i32.const 0x100) "x-key")
  (data (i32.const 0x110) ":path")
  ;; 0x200: header pairs claiming 1000 entries but holding one: count 1000, key_len 1,
  ;; value_len 1, "a\00b\00" (16 bytes), then 2 zero bytes: 18 bytes passed in all.
  (data (i32.const 0x200) "\e8\03\00\00\01\00\00\00\01\00\00\00a\00b\00\00\00")
  ;; 0x300: "raw-abi" for case 7.
  (data (i32.const 0x300) "raw-abi")
  ;; 0x400: the report line; case digit at 0x40d, status digits at 0x416..0x417.
  (data (i32.const 0x400) "raw-abi case 0 status 00")

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    ;; 8-byte alignment.
    (local.set $ptr (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
    (local.set $end (i32.add (local.get $ptr) (local.get $size)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow
                (i32.div_u
                  (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                  (i32.const 65536)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param $ctx i32) (param $size i32) (result i32)
    (global.set $case (local.get $size))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))

  (func $memory_end (result i32) (i32.mul (memory.size) (i32.const 65536)))

  ;; Logs "raw-abi case <case> status <status>".
  (func $report (param $status i32)
    (i32.store8 (i32.const 0x40d) (i32.add (i32.const 48) (i32.rem_u (global.get $case) (i32.const 10))))
    (i32.store8 (i32.const 0x416)
      (i32.add (i32.const 48) (i32.div_u (i32.rem_u (local.get $status) (i32.const 100)) (i32.const 10))))
    (i32.store8 (i32.const 0x417) (i32.add (i32.const 48) (i32.rem_u (local.get $status) (i32.const 10))))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x400) (i32.const 24))))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (block $done
      (block $c8 (block $c7 (block $c6 (block $c5 (block $c4 (block $c3 (block $c2 (block $c1 (block $none
        (br_table $none $c1 $c2 $c3 $c4 $c5 $c6 $c7 $c8 $none (global.get $case)))
        ;; no case
        (return (i32.const 0)))
        ;; 1: key pointer far beyond memory.
        (call $report (call $get_value (i32.const 0) (i32.const 0x7fff0000) (i32.const 5)
                                       (i32.const 0x80) (i32.const 0x84)))
        (br $done))
        ;; 2: valid key, out-params beyond memory.
        (call $report (call $get_value (i32.const 0) (i32.const 0x110) (i32.const 5)
                                       (i32.const 0xfffffff0) (i32.const 0xfffffff4)))
        (br $done))
        ;; 3: pairs whose count lies.
        (call $report (call $set_pairs (i32.const 0) (i32.const 0x200) (i32.const 18)))
        (br $done))
        ;; 4: log message running past the end of memory.
        (call $report (call $proxy_log (i32.const 2)
                                       (i32.sub (call $memory_end) (i32.const 16)) (i32.const 4096)))
        (br $done))
        ;; 5: pairs buffer running past the end of memory.
        (call $report (call $set_pairs (i32.const 0)
                                       (i32.sub (call $memory_end) (i32.const 8)) (i32.const 256)))
        (br $done))
        ;; 6: pointer + size wrapping around 32 bits.
        (call $report (call $get_value (i32.const 0) (i32.const 0xfffe) (i32.const 0xffffffff)
                                       (i32.const 0x80) (i32.const 0x84)))
        (br $done))
        ;; 7: no such log level.
        (call $report (call $proxy_log (i32.const 99) (i32.const 0x300) (i32.const 7)))
        (br $done))
      ;; 8: local response whose header pairs lie about their count.
      (call $report (call $local_response (i32.const 403) (i32.const 0) (i32.const 0)
                                          (i32.const 0) (i32.const 0)
                                          (i32.const 0x200) (i32.const 18) (i32.const -1))))
    (i32.const 0))
)
