"""Money is an integer amount of minor units plus an ISO 4217 currency code."""

from __future__ import annotations

# ISO 4217 codes we accept, with their minor-unit exponent. Kept explicit on purpose:
# an unknown code is a client error, never silently accepted.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2, "AUD": 2, "BRL": 2, "CAD": 2, "CHF": 2, "CLP": 0, "CNY": 2, "CZK": 2,
    "DKK": 2, "EUR": 2, "GBP": 2, "HKD": 2, "HUF": 2, "IDR": 2, "ILS": 2, "INR": 2,
    "ISK": 0, "JPY": 0, "KRW": 0, "KWD": 3, "MXN": 2, "MYR": 2, "NOK": 2, "NZD": 2,
    "PHP": 2, "PLN": 2, "SAR": 2, "SEK": 2, "SGD": 2, "THB": 2, "TRY": 2, "TWD": 2,
    "USD": 2, "VND": 0, "ZAR": 2, "BHD": 3,
}


def is_known_currency(code: str) -> bool:
    """True for an upper-case ISO 4217 code we support."""
    return code in CURRENCY_EXPONENTS


def format_amount(amount: int, currency: str) -> str:
    """Human-readable amount for summaries and logs (never used for arithmetic)."""
    exp = CURRENCY_EXPONENTS.get(currency, 2)
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**exp)
    return f"{sign}{whole:,}{'.' + str(frac).zfill(exp) if exp else ''} {currency}"
