//! The `vmstate!` macro and its helpers (see the module docs for the
//! syntax). The helpers are exported because the expansion names them
//! through `$crate`; they are not an API.

/// Declares a state struct and implements [`VmState`](crate::vmstate::VmState)
/// (save, load, description) from its field list. See
/// [the module docs](crate::vmstate) for the syntax and an example.
#[macro_export]
macro_rules! vmstate {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident as $vmsd:literal, version $ver:literal, minimum $min:literal
            $(, $hooks:ident)? {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $fname:ident : $fty:ty $([ $($opt:tt)* ])?
            ),* $(,)?
        }
        $(
            subsections {
                $(
                    $(#[$smeta:meta])*
                    $svis:vis $sname:ident : Option<$sty:ty>
                ),* $(,)?
            }
        )?
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $fname: $fty, )*
            $($( $(#[$smeta])* $svis $sname: ::core::option::Option<$sty>, )*)?
        }

        const _: () = {
            assert!(
                ($vmsd).len() <= 255,
                "a vmsd name must fit a length byte"
            );
            assert!(($min) <= ($ver), "minimum version above version");
            $($(
                assert!(
                    $crate::vmstate::is_subsection_name(
                        <$sty as $crate::vmstate::VmState>::NAME,
                        $vmsd,
                    ),
                    "a subsection's vmsd name must be \"<parent>/<child>\"",
                );
            )*)?
        };

        $crate::__vmstate_hooks!($name $(, $hooks)?);

        impl $crate::vmstate::VmState for $name {
            const NAME: &'static str = $vmsd;
            const VERSION: u32 = $ver;
            const MINIMUM: u32 = $min;
            const MIN_SIZE: usize =
                0 $( + $crate::__vmstate_field!(@min [] $fty; $($($opt)*)?) )*;
            const COMPRESSIBLE: bool = !$crate::__vmstate_any!($($($sname)*)?)
                $( && $crate::__vmstate_field!(@compress [] $fty; $($($opt)*)?) )*;

            fn empty() -> Self {
                Self {
                    $( $fname: $crate::__vmstate_field!(@empty [] $fty; $($($opt)*)?), )*
                    $($( $sname: ::core::option::Option::None, )*)?
                }
            }

            fn save_fields(
                &mut self,
                enc: &mut $crate::vmstate::Encoder,
                descs: &mut $crate::vmstate::__Vec<$crate::vmstate::FieldDesc>,
            ) -> ::core::result::Result<(), $crate::vmstate::VmStateError> {
                $(
                    $crate::__vmstate_field!(
                        @save [self enc descs $fname] $fty; $($($opt)*)?
                    );
                )*
                let _ = (enc, descs);
                Ok(())
            }

            fn save_subsections(
                &mut self,
                enc: &mut $crate::vmstate::Encoder,
                descs: &mut $crate::vmstate::__Vec<$crate::vmstate::StructDesc>,
            ) -> ::core::result::Result<(), $crate::vmstate::VmStateError> {
                $($(
                    $crate::vmstate::save_subsection(&mut self.$sname, enc, descs)?;
                )*)?
                let _ = (enc, descs);
                Ok(())
            }

            fn load_fields(
                dec: &mut $crate::vmstate::Decoder<'_>,
                version: u32,
            ) -> ::core::result::Result<Self, $crate::vmstate::VmStateError> {
                $(
                    let $fname: $fty = $crate::__vmstate_field!(
                        @load [dec version $fname] $fty; $($($opt)*)?
                    );
                )*
                let _ = (dec, version);
                Ok(Self {
                    $( $fname, )*
                    $($( $sname: ::core::option::Option::None, )*)?
                })
            }

            fn load_subsection(
                &mut self,
                name: &[u8],
                dec: &mut $crate::vmstate::Decoder<'_>,
            ) -> ::core::result::Result<bool, $crate::vmstate::VmStateError> {
                // The marker, length byte and name were just consumed.
                let at = dec.pos().saturating_sub(name.len() + 2);
                $($(
                    if name == <$sty as $crate::vmstate::VmState>::NAME.as_bytes() {
                        $crate::vmstate::load_subsection_into(&mut self.$sname, dec, at)?;
                        return Ok(true);
                    }
                )*)?
                let _ = (name, dec, at);
                Ok(false)
            }
        }

        impl $crate::vmstate::VmElem for $name {
            const TYPE_NAME: &'static str = "struct";
            const MIN_SIZE: usize = <Self as $crate::vmstate::VmState>::MIN_SIZE;
            const COMPRESSIBLE: bool = <Self as $crate::vmstate::VmState>::COMPRESSIBLE;
            fn elem_empty() -> Self {
                <Self as $crate::vmstate::VmState>::empty()
            }
            fn save_elem(
                &mut self,
                enc: &mut $crate::vmstate::Encoder,
            ) -> ::core::result::Result<
                ::core::option::Option<$crate::vmstate::StructDesc>,
                $crate::vmstate::VmStateError,
            > {
                $crate::vmstate::save_body(self, enc)
            }
            fn load_elem(
                dec: &mut $crate::vmstate::Decoder<'_>,
            ) -> ::core::result::Result<Self, $crate::vmstate::VmStateError> {
                // A nested struct is loaded at its own current version (QEMU
                // VMS_STRUCT); the version is not on the wire.
                $crate::vmstate::load_body::<Self>(dec, <Self as $crate::vmstate::VmState>::VERSION)
            }
        }

        impl $crate::vmstate::VmValue for $name {
            const MIN_SIZE: usize = <Self as $crate::vmstate::VmState>::MIN_SIZE;
            const COMPRESSIBLE: bool = <Self as $crate::vmstate::VmState>::COMPRESSIBLE;
            fn value_empty() -> Self {
                <Self as $crate::vmstate::VmState>::empty()
            }
            fn save_value(
                &mut self,
                enc: &mut $crate::vmstate::Encoder,
                name: &str,
                descs: &mut $crate::vmstate::__Vec<$crate::vmstate::FieldDesc>,
            ) -> ::core::result::Result<(), $crate::vmstate::VmStateError> {
                $crate::vmstate::save_elems(::core::slice::from_mut(self), enc, name, descs, false)
            }
            fn load_value(
                dec: &mut $crate::vmstate::Decoder<'_>,
            ) -> ::core::result::Result<Self, $crate::vmstate::VmStateError> {
                <Self as $crate::vmstate::VmElem>::load_elem(dec)
            }
        }
    };
}

/// Default hooks unless the header says `hooks`.
#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_hooks {
    ($name:ident) => {
        impl $crate::vmstate::VmStateHooks for $name {}
    };
    ($name:ident, hooks) => {};
}

/// `true` if any token is given.
#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_any {
    () => {
        false
    };
    ($($t:tt)+) => {
        true
    };
}

/// Normalises a field's options (`since N`, `count = f`, `len = f`,
/// `buffer`, `max = E`, comma-separated, any order) and hands them to
/// `__vmstate_emit!` as `[since] [kind] [max]`.
#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_field {
    (@$op:ident [$($args:tt)*] $t:ty; $($opt:tt)*) => {
        $crate::__vmstate_opts!([$op [$($args)*] $t] [] [] [] $($opt)*)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_opts {
    ([$($ctx:tt)*] $s:tt $k:tt $m:tt) => {
        $crate::__vmstate_emit!($($ctx)*; $s $k $m)
    };
    ([$($ctx:tt)*] $s:tt $k:tt $m:tt , $($rest:tt)*) => {
        $crate::__vmstate_opts!([$($ctx)*] $s $k $m $($rest)*)
    };
    ([$($ctx:tt)*] [] $k:tt $m:tt since $v:literal $($rest:tt)*) => {
        $crate::__vmstate_opts!([$($ctx)*] [$v] $k $m $($rest)*)
    };
    ([$($ctx:tt)*] $s:tt [] $m:tt count = $c:ident $($rest:tt)*) => {
        $crate::__vmstate_opts!([$($ctx)*] $s [count $c] $m $($rest)*)
    };
    ([$($ctx:tt)*] $s:tt [] $m:tt len = $c:ident $($rest:tt)*) => {
        $crate::__vmstate_opts!([$($ctx)*] $s [len $c] $m $($rest)*)
    };
    ([$($ctx:tt)*] $s:tt [] $m:tt buffer $($rest:tt)*) => {
        $crate::__vmstate_opts!([$($ctx)*] $s [buffer] $m $($rest)*)
    };
    ([$($ctx:tt)*] $s:tt $k:tt [] max = $x:tt $($rest:tt)*) => {
        $crate::__vmstate_opts!([$($ctx)*] $s $k [$x] $($rest)*)
    };
}

/// `since` as a number (0 when absent).
#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_since {
    () => {
        0u32
    };
    ($v:literal) => {
        $v
    };
}

/// `max` as an `Option<u64>`.
#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_max {
    () => {
        ::core::option::Option::None
    };
    ($x:tt) => {
        ::core::option::Option::Some(($x) as u64)
    };
}

/// The code for one field and one operation.
#[doc(hidden)]
#[macro_export]
macro_rules! __vmstate_emit {
    // Fewest bytes on the wire at the struct's own version.
    (min [] $t:ty; [$($s:tt)*] [] [$($m:tt)*]) => {
        $crate::__vmstate_emit!(@min_if [$($s)*] <$t as $crate::vmstate::VmValue>::MIN_SIZE)
    };
    (min [] $t:ty; [$($s:tt)*] [buffer] [$($m:tt)*]) => {
        $crate::__vmstate_emit!(@min_if [$($s)*] <$t as $crate::vmstate::VmValue>::MIN_SIZE)
    };
    (min [] $t:ty; [$($s:tt)*] [$kind:ident $c:ident] [$($m:tt)*]) => {
        0usize
    };
    (@min_if [$($s:tt)*] $e:expr) => {
        if $crate::vmstate::field_present(
            <Self as $crate::vmstate::VmState>::VERSION,
            $crate::__vmstate_since!($($s)*),
        ) {
            $e
        } else {
            0usize
        }
    };

    // Whether arrays of the struct can be described by element 0.
    (compress [] $t:ty; $s:tt [] $m:tt) => {
        <$t as $crate::vmstate::VmValue>::COMPRESSIBLE
    };
    (compress [] $t:ty; $s:tt [count $c:ident] $m:tt) => {
        <$t as $crate::vmstate::VmCounted>::COMPRESSIBLE
    };
    (compress [] $t:ty; $s:tt [$kind:ident $($c:ident)?] $m:tt) => {
        true
    };

    // The empty value.
    (empty [] $t:ty; $s:tt [] $m:tt) => {
        <$t as $crate::vmstate::VmValue>::value_empty()
    };
    (empty [] $t:ty; $s:tt [buffer] $m:tt) => {
        <$t as $crate::vmstate::VmValue>::value_empty()
    };
    (empty [] $t:ty; $s:tt [$kind:ident $c:ident] $m:tt) => {
        ::core::default::Default::default()
    };

    // Save (at the struct's own version).
    (save [$this:tt $enc:ident $descs:ident $f:ident] $t:ty; [$($s:tt)*] $k:tt $m:tt) => {
        if $crate::vmstate::field_present(
            <Self as $crate::vmstate::VmState>::VERSION,
            $crate::__vmstate_since!($($s)*),
        ) {
            $crate::__vmstate_emit!(@save_kind [$this $enc $descs $f] $k $m)
                .map_err(|e| e.in_field(stringify!($f)))?;
        }
    };
    (@save_kind [$this:tt $enc:ident $descs:ident $f:ident] [] $m:tt) => {
        $crate::vmstate::VmValue::save_value(&mut $this.$f, $enc, stringify!($f), $descs)
    };
    (@save_kind [$this:tt $enc:ident $descs:ident $f:ident] [buffer] $m:tt) => {{
        $crate::vmstate::save_buffer(&$this.$f[..], $enc, stringify!($f), $descs);
        ::core::result::Result::<(), $crate::vmstate::VmStateError>::Ok(())
    }};
    (@save_kind [$this:tt $enc:ident $descs:ident $f:ident] [count $c:ident] [$($m:tt)*]) => {
        $crate::vmstate::save_counted(
            &mut $this.$f[..],
            &$this.$c,
            $crate::__vmstate_max!($($m)*),
            $enc,
            stringify!($f),
            $descs,
        )
    };
    (@save_kind [$this:tt $enc:ident $descs:ident $f:ident] [len $c:ident] [$($m:tt)*]) => {
        $crate::vmstate::save_vbuffer(
            &$this.$f[..],
            &$this.$c,
            $crate::__vmstate_max!($($m)*),
            $enc,
            stringify!($f),
            $descs,
        )
    };

    // Load (at the stream's version); absent fields get the empty value.
    (load [$dec:ident $version:ident $f:ident] $t:ty; [$($s:tt)*] $k:tt $m:tt) => {
        if $crate::vmstate::field_present($version, $crate::__vmstate_since!($($s)*)) {
            $crate::__vmstate_emit!(@load_kind [$dec] $t; $k $m)
                .map_err(|e| e.in_field(stringify!($f)))?
        } else {
            $crate::__vmstate_emit!(empty [] $t; [] $k $m)
        }
    };
    (@load_kind [$dec:ident] $t:ty; [] $m:tt) => {
        <$t as $crate::vmstate::VmValue>::load_value($dec)
    };
    (@load_kind [$dec:ident] $t:ty; [buffer] $m:tt) => {
        $crate::vmstate::load_buffer($dec)
    };
    (@load_kind [$dec:ident] $t:ty; [count $c:ident] [$($m:tt)*]) => {
        $crate::vmstate::load_counted($dec, &$c, $crate::__vmstate_max!($($m)*))
    };
    (@load_kind [$dec:ident] $t:ty; [len $c:ident] [$($m:tt)*]) => {
        $crate::vmstate::load_vbuffer($dec, &$c, $crate::__vmstate_max!($($m)*))
    };
}
