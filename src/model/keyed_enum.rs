//! `keyed_enum!`: an enum whose every variant travels as one fixed text.

/// Declares an enum whose every variant travels as one fixed text, so each
/// variant, its text and its doc are written once. Generates the enum,
/// `COUNT`, `ALL` (in declaration order), the text accessor named after
/// `text`, and `from_wire`.
macro_rules! keyed_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident, text $text:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// How many there are.
            pub const COUNT: usize = [$($wire),+].len();
            /// Every one, in declaration order.
            pub const ALL: [$name; $name::COUNT] = [$($name::$variant),+];

            /// The text it travels as.
            pub const fn $text(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }

            /// The one that travels as `s`, if any.
            pub fn from_wire(s: &str) -> Option<Self> {
                match s {
                    $($wire => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use keyed_enum;
